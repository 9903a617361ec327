"""The portable backend: padfree's ops written with stock PyTorch operators (oneDNN/MKL on the CPU).

Runs on any device and dtype. Attention groups sequences of equal length into one batched
``scaled_dot_product_attention`` call, so no pad token is ever computed and short sequences do not each
pay a call's overhead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .relative import RelativeScores, relative_score_terms


def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                     rel: RelativeScores | None = None) -> torch.Tensor:
    """See :func:`padfree.ops.reference.varlen_attention_ref`. ``[T, 3H]`` -> ``[T, H]``.

    Relative-position terms (``rel``) become an additive ``[g, heads, L, L]`` mask per group of equal-length
    sequences: built per sequence length, never for a padded batch."""
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    scale_ = 1.0 / d ** 0.5 if scale is None else scale
    if qkv_bias is not None:
        qkv = qkv + qkv_bias
    x = qkv.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    bounds = cu_seqlens.tolist()
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(n, []).append(b)
    for n, members in groups.items():
        if len(members) == 1:
            s = bounds[members[0]]
            qkv_g = x[s:s + n].unsqueeze(0)  # [1, L, 3, heads, d], a view
            rows = None
        else:
            starts = torch.tensor([bounds[b] for b in members], device=qkv.device)
            rows = (starts[:, None] + torch.arange(n, device=qkv.device)).reshape(-1)  # [g*L]
            qkv_g = x[rows].view(len(members), n, 3, num_heads, d)  # [g, L, 3, heads, d]
        q, k, v = (qkv_g[:, :, i].transpose(1, 2) for i in range(3))  # each [g, heads, L, d]
        mask = None if rel is None else relative_score_terms(q, k, rel, max_seqlen, scale_).to(q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale_).transpose(1, 2)  # [g, L, heads, d]
        if rows is None:
            out[bounds[members[0]]:bounds[members[0]] + n] = ctx[0]
        else:
            out[rows] = ctx.reshape(-1, num_heads, d)
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
