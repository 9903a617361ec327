"""The portable backend: padfree's ops written with stock PyTorch operators (oneDNN/MKL on the CPU).

Runs on any device and dtype. Attention makes one batched ``scaled_dot_product_attention`` call per *run*
of consecutive sequences of equal length: a run is a contiguous slice of the packed tensor, viewed as
``[g, L, 3, heads, d]`` with no gather and written back with no scatter, so no pad token is ever computed and
short sequences do not each pay a call's overhead (``SentenceEncoder`` sorts inside each batch, so each
distinct length is one run).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .relative import RelativeScores, relative_score_terms


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                     rel: RelativeScores | None = None) -> torch.Tensor:
    """See :func:`padfree.ops.reference.varlen_attention_ref`. ``[T, 3H]`` -> ``[T, H]``.

    Relative-position terms (``rel``) become an additive ``[g, heads, L, L]`` mask per run of equal-length
    sequences: built per sequence length, never for a padded batch."""
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    scale_ = 1.0 / d ** 0.5 if scale is None else scale
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    x = qkv.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    for start, count, n in equal_length_runs(cu_seqlens):
        end = start + count * n
        g = x[start:end].view(count, n, 3, num_heads, d)  # a view of the run, no gather
        q, k, v = (g[:, :, i].transpose(1, 2) for i in range(3))  # each [count, heads, L, d], strided views
        mask = None if rel is None else relative_score_terms(q, k, rel, max_seqlen, scale_).to(q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale_)  # [count, heads, L, d]
        out[start:end].view(count, n, num_heads, d).copy_(ctx.transpose(1, 2))  # written in place, no scatter
    return out.view(T, H)


def add_bias_residual_layer_norm(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                 weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)``; ``[T, H]``. PyTorch's CPU LayerNorm keeps fp32 statistics for bf16."""
    y = x + residual if bias is None else torch.add(x, residual).add_(bias)
    return F.layer_norm(y, y.shape[-1:], weight, ln_bias, eps)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(x + bias)``; ``[T, F]``."""
    return apply_activation(x if bias is None else x + bias, activation)


def embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
                     eps: float) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``; returns ``[T, E]``."""
    y = F.embedding(input_ids, word)
    if position is not None:
        y = y + F.embedding(position_ids, position)
    if token_type is not None:
        y = y + F.embedding(token_type_ids, token_type)
    return F.layer_norm(y, y.shape[-1:], weight, bias, eps)


_runs_cache: list = [None, None, None]  # [weakref to the cu_seqlens tensor last seen, its version, its runs]


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for inference tensors, which keep none).

    Asked first, not caught: reading ``_version`` of an inference tensor raises a C++ error whose message
    carries a backtrace, ~65 us each time; every batch built under inference mode paid it once per layer."""
    return -1 if t.is_inference() else t._version


def equal_length_runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(first token, number of sequences, length)`` of each run of equal lengths; computed once per batch
    (every layer passes the same ``cu_seqlens`` tensor), so the host sync happens once, not per layer. A tensor
    refilled in place (CUDA-graph static buffers) has a new version and is read again."""
    ref, version = _runs_cache[0], tensor_version(cu_seqlens)
    if ref is not None and ref() is cu_seqlens and _runs_cache[1] == version:
        return _runs_cache[2]
    bounds = cu_seqlens.tolist()
    runs: list[tuple[int, int, int]] = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = e - s
        if runs and runs[-1][2] == n:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, n)
        else:
            runs.append((s, 1, n))
    _runs_cache[:] = [weakref.ref(cu_seqlens), version, runs]
    return runs
