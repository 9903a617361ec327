"""The CPU backend of int8 products: every op that multiplies by a weight, on int8 weights and activations.

A model loaded with ``dtype="int8"`` (:func:`padfree.from_pretrained`) keeps fp32 weights, activations and
primitives, and resolves its product ops here (the registry's ``products="int8"``). Each weight ``[N, K]`` is
quantized once per output column (symmetric, ``scale = max|w| / 127``; :func:`weight`, cached per parameter like the
CPU backend's packings), each product's input per token at run time (``max|x| / 127``), and the native module
multiplies the int8 values with exact int32 sums, then dequantizes, adds the bias and applies the activation or the
residual in the same pass (``int8_linear`` in ``small_layers.cpp``). The attention, softmax, LayerNorms and the
embedding stay fp32; so does BERT's pooler (a few rows). Shapes: T = packed tokens, K = input features, N = output
features. Why AVX2 kernels on int16-held values, and what they gain where: benchmarks/NOTES.md, section 26.
"""
from __future__ import annotations

import torch

from .. import cpu
from ..cpu import CpuPlan
from . import native, onednn_backend, torch_backend
from .activations import apply_activation
from .onednn_backend import _fp32, packed_weight
from .relative import RelativeScores

_FUSED_ACTIVATIONS = frozenset({"gelu", "gelu_tanh", "relu", "silu"})  # those int8_linear applies in its epilogue
def weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` as the native int8 packing and its per-column scales ``[N]`` (made once per parameter)."""
    return packed_weight(w, "int8")


def _product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, plan: CpuPlan, activation: str = "none",
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(x @ w.T + bias) + residual`` on int8 operands: ``[T, K] -> [T, N]`` fp32."""
    packed, scales = weight(w)
    return native.module().int8_linear(x.float().contiguous(), packed, scales, w.shape[0],
                                       None if bias is None else _fp32(bias).contiguous(), activation,
                                       None if residual is None else residual.float().contiguous(), None,
                                       plan.int8_isa)


def qkv_varlen_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int, num_heads: int, scale: float | None = None,
                         rel: RelativeScores | None = None, runs=None, rotary=None, window=None,
                         plan: CpuPlan | None = None) -> torch.Tensor:
    """The QKV product (int8) then the fp32 attention of each packed sequence: ``[T, H] -> [T, H]``."""
    qkv = _product(x, weight, bias, plan or cpu.current())  # [T, 3H]
    return torch_backend.varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, None, scale, rel, runs,
                                          rotary, window)


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                    plan: CpuPlan | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``: ``[T, K] -> [T, N]``, the activation in the product's epilogue where it has it."""
    plan = plan or cpu.current()
    if activation in _FUSED_ACTIVATIONS:
        return _product(x, weight, bias, plan, activation)
    return apply_activation(_product(x, weight, bias, plan), activation, inplace=True)


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str,
                     plan: CpuPlan | None = None) -> torch.Tensor:
    """``act(input) * gate`` of ``x @ weight.T + bias = [input | gate]``: ``[T, K] -> [T, N / 2]``."""
    return torch_backend.gated_act(_product(x, weight, bias, plan or cpu.current()), None, activation)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                    plan: CpuPlan | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + residual``: ``[T, K] -> [T, N]`` (a pre-LN layer's output products)."""
    return _product(x, weight, bias, plan or cpu.current(), residual=residual)


def linear_residual_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor | None,
                               eps: float, plan: CpuPlan | None = None) -> torch.Tensor:
    """``LayerNorm(x @ weight.T + bias + residual)``: ``[T, K] -> [T, N]``, the residual added in the epilogue."""
    y = _product(x, weight, bias, plan or cpu.current(), residual=residual)
    return torch.layer_norm(y, y.shape[-1:], ln_weight, ln_bias, eps)


def linear_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: CpuPlan | None = None) -> torch.Tensor:
    """BERT's pooler, kept in fp32 (the CPU backend's): a few rows, read by classification heads."""
    return onednn_backend.linear_tanh(x, weight, bias, plan)


def post_ln_layers(x: torch.Tensor, layers, runs, num_heads: int, scale: float, eps: float, activation: str,
                   plan: CpuPlan | None = None) -> torch.Tensor | None:
    """The post-LN stack of a batch of any size in one native call on the int8 products (the layer-by-layer path
    multiplies on the same kernel, with Python between the ops: NOTES.md section 26); None where the stack does not
    apply (the encoder then runs the layers one by one)."""
    return onednn_backend.run_stack(x, layers, runs, num_heads, scale, eps, activation, "int8", plan or cpu.current())
