"""The CPU backend for the matrix products: oneDNN linears with prepacked weights and fused epilogues.

It implements only the *fused* ops (a linear followed by what consumes it); the elementwise primitives stay with
the portable torch backend. On this machine kind (2-core AVX-512-bf16 EPYC) a oneDNN linear on a weight reordered
once into oneDNN's blocked layout is 10-20 % faster than ``F.linear`` (MKL) in fp32 and a few % in bf16, and the
epilogues save whole passes over ``[T, F]`` / ``[T, H]`` (see benchmarks/NOTES.md for each measurement):

- ``linear_bias_act``: bias and GELU/ReLU/SiLU run inside the matrix product (oneDNN eltwise post-op);
- ``linear_residual_layer_norm``: bias and residual add inside the product (oneDNN binary post-op), then LayerNorm;
- ``qkv_varlen_attention``: the QKV product with its bias inside, then attention per group of equal-length
  sequences straight on strided views of ``[T, 3H]`` (PyTorch's CPU flash
  kernel runs in bf16: converting to fp32 was speed-neutral on W1 and 20 % slower on W2, see NOTES.md).

Packed weights are cached per parameter (weakly, and keyed by the parameter's version counter, so an in-place
update of the weight repacks it). Shapes: T = packed tokens, K = input features, N = output features.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from . import torch_backend
from .activations import apply_activation
from .relative import RelativeScores

# canonical activation -> oneDNN eltwise post-op (name, algorithm) of torch.ops.mkldnn._linear_pointwise
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""), "silu": ("swish", "")}


_packed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight ref, version, packed)
_packing = threading.Lock()  # serialises filling _packed (the hit path reads it without a lock)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` reordered once into oneDNN's blocked layout (cached while the parameter lives).

    Safe from many threads: a hit is one dict read; a miss packs under a lock, re-checking first, so two
    threads never pack the same weight or interleave an entry with its finaliser."""
    key, version = id(weight), torch_backend.tensor_version(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    with _packing:
        hit = _packed.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == version:
            return hit[2]
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        if hit is None or hit[0]() is not weight:  # a new parameter: drop its entry when it dies
            weakref.finalize(weight, _forget, key, weakref.ref(weight))
        _packed[key] = (weakref.ref(weight), version, packed)
    return packed


def _forget(key: int, ref: weakref.ref) -> None:
    """Finaliser of a packed parameter: drop its entry, unless the id now belongs to a newer parameter."""
    with _packing:
        hit = _packed.get(key)
        if hit is not None and hit[0]() is None:
            del _packed[key]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, post_op: str = "none",
            algorithm: str = "") -> torch.Tensor:
    """``post_op(x @ weight.T + bias)``: ``[T, K] -> [T, N]`` on the packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, post_op, [], algorithm)


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """``act(x @ weight.T + bias)``: ``[T, K] -> [T, N]``, the activation fused where oneDNN has it."""
    if activation in _POST_OPS:
        return _linear(x, weight, bias, *_POST_OPS[activation])
    return apply_activation(_linear(x, weight, bias), activation)


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str) -> torch.Tensor:
    """``act(input) * gate`` of ``x @ weight.T + bias = [input | gate]``: ``[T, K] -> [T, N / 2]`` (the bias
    inside the product)."""
    return torch_backend.gated_act(_linear(x, weight, bias), None, activation)


def linear_residual_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                               eps: float) -> torch.Tensor:
    """``LayerNorm(x @ weight.T + bias + residual)``: ``[T, K] -> [T, N]`` (fp32 LayerNorm statistics)."""
    y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed_weight(weight), bias, "add")  # [T, N]
    return F.layer_norm(y, y.shape[-1:], ln_weight, ln_bias, eps)


def qkv_varlen_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int, num_heads: int, scale: float | None = None,
                         rel: RelativeScores | None = None, runs=None, rotary=None, window=None) -> torch.Tensor:
    """Self-attention of each packed sequence on ``x [T, H]`` with the fused ``[3H, H]`` QKV projection:
    returns the context ``[T, H]`` in x's dtype. ``rel``: relative-position terms (q and k include the bias);
    ``runs``: the batch's runs of equal lengths (``PackedBatch.runs``); ``rotary``/``window``: see the torch
    backend's varlen_attention."""
    qkv = _linear(x, weight, bias)  # [T, 3H], bias added inside the product
    return torch_backend.varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, None, scale, rel, runs,
                                          rotary, window)
