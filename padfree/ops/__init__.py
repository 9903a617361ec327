"""padfree's ops: the primitives the models call, each with a pure-PyTorch reference and backends.

The public functions here resolve their op per call (convenient for users and tests); encoders resolve every
op once into :class:`padfree.ops.registry.Kernels`. Both go through the one resolver,
:func:`padfree.ops.registry.select` (the op table, backends and composition of fused ops live there).
"""
from __future__ import annotations

import torch

from .activations import canonical_activation
from .reference import (add_bias_residual_layer_norm_ref, bias_act_ref, embed_layer_norm_ref, gated_act_ref,
                        rms_norm_ref, rotary_ref, varlen_attention_ref)
from .registry import BACKENDS, OPS, Backend, Kernels, select
from .relative import RelativeScores
from .rotary import apply_rotary, rotary_tables


def varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias=None, scale=None, backend="auto", rel=None,
                     rotary=None, window=None):
    """Self-attention inside each packed sequence: ``qkv [T, 3H]`` -> context ``[T, H]``.

    ``rel``: optional :class:`RelativeScores` (relative-position score terms, per sequence); ``rotary``: optional
    ``(cos, sin)`` from :func:`rotary_tables`, rotating Q and K; ``window``: keys within ``|i - j| <= window``."""
    extra = {n: v for n, v in (("rel", rel), ("rotary", rotary), ("window", window)) if v is not None}
    features = frozenset(f for f, v in (("rotary", rotary), ("sliding_window", window)) if v is not None)
    _, fn = select("varlen_attention", qkv.device, qkv.dtype, qkv.shape[1] // 3 // num_heads, backend,
                   relative_scores=rel is not None, features=features)
    return fn(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias, scale, **extra)


def gated_act(x, bias, activation, backend="auto"):
    """``act(input) * gate`` where ``x + bias = [input | gate]``: ``[T, 2F]`` -> ``[T, F]`` (GeGLU)."""
    _, fn = select("gated_act", x.device, x.dtype, backend=backend)
    return fn(x, bias, canonical_activation(activation))


def add_bias_residual_layer_norm(x, bias, residual, weight, ln_bias, eps, backend="auto"):
    """``LayerNorm(x + bias + residual)`` with fp32 statistics: ``[T, H]``."""
    _, fn = select("add_bias_residual_layer_norm", x.device, x.dtype, backend=backend)
    return fn(x, bias, residual, weight, ln_bias, eps)


def rms_norm(x, weight, eps, backend="auto"):
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * weight`` with fp32 statistics: ``[T, H]`` (EuroBERT)."""
    _, fn = select("rms_norm", x.device, x.dtype, backend=backend)
    return fn(x, weight, eps)


def bias_act(x, bias, activation, backend="auto"):
    """``act(x + bias)``: ``[T, F]``; ``activation`` a canonical or Hugging Face name."""
    _, fn = select("bias_act", x.device, x.dtype, backend=backend)
    return fn(x, bias, canonical_activation(activation))


def embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps,
                     backend="auto"):
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``: ``[T, E]``."""
    _, fn = select("embed_layer_norm", word.device, word.dtype, backend=backend,
                   features=frozenset({"norm_without_bias"} if bias is None else ()))
    return fn(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias, eps)


__all__ = ["varlen_attention", "add_bias_residual_layer_norm", "bias_act", "gated_act", "embed_layer_norm",
           "rms_norm", "apply_rotary", "rotary_tables",
           "varlen_attention_ref", "add_bias_residual_layer_norm_ref", "bias_act_ref", "gated_act_ref",
           "embed_layer_norm_ref", "rms_norm_ref", "rotary_ref",
           "BACKENDS", "OPS", "Backend", "Kernels", "select", "canonical_activation", "RelativeScores"]
