"""The Triton backend (CUDA): padfree's ops as fused Triton kernels, one module per kernel.

Imported only when the registry selects this backend, so ``import padfree`` never imports Triton.
Same names and signatures as :mod:`padfree.ops.torch_backend`.
"""
from __future__ import annotations

from .triton_activation import bias_act, gated_act
from .triton_attention import varlen_attention
from .triton_embedding import embed_layer_norm
from .triton_layer_norm import add_bias_residual_layer_norm, rms_norm

__all__ = ["varlen_attention", "add_bias_residual_layer_norm", "bias_act", "gated_act", "embed_layer_norm",
           "rms_norm"]
