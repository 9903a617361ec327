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

import weakref

import torch
import torch.nn.functional as F

from .activations import apply_activation

# canonical activation -> oneDNN eltwise post-op (name, algorithm) of torch.ops.mkldnn._linear_pointwise
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""), "silu": ("swish", "")}

_ATTENTION_IN_FP32 = False  # measured: the fp32 upcast costs ~20 % of a W2 bf16 encode (NOTES.md #2)

_packed: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight ref, version, packed)


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter; they cannot be modified in place either
        return -1


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` reordered once into oneDNN's blocked layout (cached while the parameter lives)."""
    key, version = id(weight), _version(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _packed[key] = (weakref.ref(weight), version, packed)
    weakref.finalize(weight, _packed.pop, key, None)
    return packed


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


def linear_residual_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                               eps: float) -> torch.Tensor:
    """``LayerNorm(x @ weight.T + bias + residual)``: ``[T, K] -> [T, N]`` (fp32 LayerNorm statistics)."""
    y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed_weight(weight), bias, "add")  # [T, N]
    return F.layer_norm(y, y.shape[-1:], ln_weight, ln_bias, eps)


def qkv_varlen_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Self-attention of each packed sequence on ``x [T, H]`` with the fused ``[3H, H]`` QKV projection:
    returns the context ``[T, H]`` in x's dtype."""
    qkv = _linear(x, weight, bias)  # [T, 3H], bias added inside the product
    if qkv.dtype == torch.bfloat16 and _ATTENTION_IN_FP32:
        qkv = qkv.float()  # kept as an option: fp32 softmax/accumulation; costs two conversion passes
    return varlen_attention_runs(qkv, cu_seqlens, num_heads, scale).to(x.dtype)


def varlen_attention_runs(qkv: torch.Tensor, cu_seqlens: torch.Tensor, num_heads: int,
                          scale: float | None = None) -> torch.Tensor:
    """Attention on ``qkv [T, 3H]`` (bias already in) -> ``[T, H]``, one SDPA call per *run* of consecutive
    sequences of equal length: a run is a contiguous slice of the packed tensor, viewed as ``[g, L, 3, heads, d]``
    with no gather and written back with no scatter. Batches sorted by length (SentenceEncoder sorts inside
    each token-budget batch) have one run per distinct length."""
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    x = qkv.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    for start, count, n in _runs(cu_seqlens):
        end = start + count * n
        g = x[start:end].view(count, n, 3, num_heads, d)  # a view of the run
        q, k, v = (g[:, :, i].transpose(1, 2) for i in range(3))  # each [count, heads, L, d], strided views
        ctx = F.scaled_dot_product_attention(q, k, v, scale=scale)  # [count, heads, L, d]
        out[start:end].view(count, n, num_heads, d).copy_(ctx.transpose(1, 2))
    return out.view(T, H)


_runs_cache: list = [None, None]  # [weakref to the cu_seqlens tensor last seen, its runs]


def _runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first token, number of sequences, length)`` of each run of equal lengths; computed once per batch
    (every layer passes the same ``cu_seqlens`` tensor), so the host sync happens once, not per layer."""
    ref = _runs_cache[0]
    if ref is not None and ref() is cu_seqlens:
        return _runs_cache[1]
    bounds = cu_seqlens.tolist()
    runs: list[tuple[int, int, int]] = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if runs and runs[-1][2] == n:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, n)
        else:
            runs.append((s, 1, n))
    _runs_cache[0], _runs_cache[1] = weakref.ref(cu_seqlens), runs
    return runs
