"""The portable backend: padfree's ops written with stock PyTorch operators (oneDNN/MKL on the CPU).

Runs on any device and dtype. Attention makes one batched ``scaled_dot_product_attention`` call per *run*
of consecutive sequences of equal length: a run is a contiguous slice of the packed tensor, viewed as
``[g, L, 3, heads, d]`` with no gather and written back with no scatter (a single run's context is the kernel's
output itself), so no pad token is ever computed and short sequences do not each pay a call's overhead
(``SentenceEncoder`` sorts inside each batch, so each distinct length is one run). A sliding window (ModernBERT's
local layers) splits each run's queries into blocks that score only the keys of their neighbouring blocks, in one
batched call: ``O(L * window)`` per sequence, never ``L x L`` for a long one.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..batch import HostLayout
from .activations import apply_activation
from .relative import RelativeScores, relative_score_terms
from .rotary import rotate


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                     rel: RelativeScores | None = None, runs: Sequence[tuple[int, int, int]] | None = None,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None
                     ) -> torch.Tensor:
    """See :func:`padfree.ops.reference.varlen_attention_ref`. ``[T, 3H]`` -> ``[T, H]``.

    ``runs``: the batch's runs of equal lengths, known on the host (``PackedBatch.runs``; the encoder passes
    them); when absent they are read from ``cu_seqlens`` (one host read). Relative-position terms (``rel``)
    become an additive ``[g, heads, L, L]`` mask per run: built per sequence length, never for a padded batch.
    ``rotary``: ``(cos, sin)`` ``[T, d/2]`` applied to Q and K (:mod:`padfree.ops.rotary`); ``window``: keys
    within ``|i - j| <= window`` only (not combined with ``rel``)."""
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    scale_ = 1.0 / d ** 0.5 if scale is None else scale
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    if window is not None and rel is not None:
        raise ValueError("a sliding window with relative-position terms is not supported")
    x = qkv.view(T, 3, num_heads, d)
    runs = equal_length_runs(cu_seqlens) if runs is None else runs
    # one run (batch 1, or equal lengths): its context is returned as the kernel wrote it; several: each is
    # written into its slice of one output (no scatter)
    whole = len(runs) == 1 and runs[0][0] == 0 and runs[0][1] * runs[0][2] == T  # (bucketed batches have spare slots)
    out = None if whole else torch.empty(T, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    for start, count, n in runs:
        if n == 0:  # empty sequence slots (the CUDA-graph runner's static layout)
            continue
        end = start + count * n
        # q, k, v [count, heads, L, d]: strided views of the run, no gather (made in one op: each small op costs
        # microseconds at batch 1, where the caches are cold after a linear)
        q, k, v = x[start:end].view(count, n, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        if rotary is not None:  # Q and K of the run rotated into new tensors (V is read where it is)
            cos, sin = (t[start:end].view(count, 1, n, -1) for t in rotary)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if window is not None and n - 1 > window:
            ctx = _windowed_attention(q, k, v, window, scale_)  # [count, L, heads, d]
        else:
            mask = None if rel is None else relative_score_terms(q, k, rel, max_seqlen, scale_).to(q.dtype)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale_).transpose(1, 2)
        if out is None:  # a view where the kernel wrote [count, L, heads, d] (the CPU flash kernel), else a copy
            return ctx.reshape(T, H)
        out[start:end].view(count, n, num_heads, d).copy_(ctx)
    return qkv.new_empty(T, H) if out is None else out.view(T, H)  # (None: one run of empty sequences)


def _windowed_attention(q, k, v, window: int, scale: float) -> torch.Tensor:
    """Sliding-window attention of ``g`` sequences of length L: ``q, k, v [g, heads, L, d]``; query i sees keys
    ``|i - j| <= window``. One batched call: the queries go in blocks of ``b >= window`` rows, and block i scores
    the ``3b`` keys of blocks i-1, i, i+1 (overlapping windows of the zero-padded keys, ``unfold``), under one
    ``[blocks, b, 3b]`` band mask that also masks the padding: ``O(L * window)`` work and memory, no Python loop
    over blocks. Returns the context ``[g, L, heads, d]``."""
    g, h, L, d = q.shape
    b = max(window, 32)
    nb = -(-L // b)  # query blocks
    qp = q.new_zeros(g, nb * b, h, d)
    qp[:, :L] = q.transpose(1, 2)
    kp, vp = (x.new_zeros(g, (nb + 2) * b, h, d) for x in (k, v))  # one zero block before, padding after
    kp[:, b:b + L] = k.transpose(1, 2)
    vp[:, b:b + L] = v.transpose(1, 2)
    qb = qp.view(g * nb, b, h, d).transpose(1, 2)  # [g nb, heads, b, d]
    kb, vb = (x.unfold(1, 3 * b, b).reshape(g * nb, h, d, 3 * b).transpose(-1, -2) for x in (kp, vp))  # [g nb, heads, 3b, d]
    rows = torch.arange(b, device=q.device)
    cols = torch.arange(3 * b, device=q.device)
    key_pos = (torch.arange(nb, device=q.device)[:, None] - 1) * b + cols[None, :]  # [nb, 3b]
    band = ((rows[:, None] + b - cols[None, :]).abs() <= window)[None] & ((key_pos >= 0) & (key_pos < L))[:, None]
    band = band[:, None].expand(nb, 1, b, 3 * b)  # [nb, 1, b, 3b], True = attend
    if g > 1:
        band = band.repeat(g, 1, 1, 1)
    ctx = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=band, scale=scale)  # [g nb, heads, b, d]
    return ctx.transpose(1, 2).reshape(g, nb * b, h, d)[:, :L]


def gated_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(input) * gate`` of ``x + bias = [input | gate]``: ``[T, 2F]`` -> ``[T, F]``."""
    if bias is not None:
        x = x + bias
    f = x.shape[-1] // 2
    return apply_activation(x[:, :f], activation).mul_(x[:, f:])


def add_bias_residual_layer_norm(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                 weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)``; ``[T, H]``. PyTorch's CPU LayerNorm keeps fp32 statistics for bf16."""
    y = x + residual if bias is None else torch.add(x, residual).add_(bias)
    return F.layer_norm(y, y.shape[-1:], weight, ln_bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * weight``; ``[T, H]``, statistics and scaling in fp32."""
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(x + bias)``; ``[T, F]``."""
    return apply_activation(x, activation) if bias is None else apply_activation(x + bias, activation, inplace=True)


def embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
                     eps: float) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``; returns ``[T, E]``."""
    y = F.embedding(input_ids, word)
    if position is not None:
        y = y + F.embedding(position_ids, position)
    if token_type is not None:
        y = y + F.embedding(token_type_ids, token_type)
    return F.layer_norm(y, y.shape[-1:], weight, bias, eps)


def tensor_version(t: torch.Tensor) -> int:
    """The tensor's in-place modification counter (-1 for inference tensors, which keep none).

    Asked first, not caught: reading ``_version`` of an inference tensor raises a C++ error whose message
    carries a backtrace, ~65 us each time; every batch built under inference mode paid it once per layer."""
    return -1 if t.is_inference() else t._version


def equal_length_runs(cu_seqlens: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    """``(first token, number of sequences, length)`` of each run of equal lengths, read from ``cu_seqlens``
    (one host read). The encoder never calls this: its batches carry their runs (``PackedBatch.runs``)."""
    bounds = cu_seqlens.tolist()
    return HostLayout.of([e - s for s, e in zip(bounds[:-1], bounds[1:])]).runs
