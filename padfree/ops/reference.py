"""Pure-PyTorch references of padfree's ops: plain, per-sequence, fp32 math.

These define what every backend must compute; tests compare backends against them. They favour clarity
over speed (a Python loop over sequences for attention) and are not used on the hot path.
Shapes: T = packed tokens, H = hidden size, F = FFN size, B = sequences.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .relative import RelativeScores, relative_score_terms


def varlen_attention_ref(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                         qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                         rel: RelativeScores | None = None) -> torch.Tensor:
    """Multi-head self-attention inside each sequence of a packed batch.

    qkv: ``[T, 3*H]`` (Q | K | V, each ``[heads, head_dim]``); qkv_bias: ``[3*H]`` added before attention;
    rel: optional relative-position score terms (see :class:`padfree.ops.relative.RelativeScores`), taken
    within each sequence; returns the context ``[T, H]`` in qkv's dtype, computed in fp32.
    """
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    x = qkv.float() + (0 if qkv_bias is None else qkv_bias.float())
    x = x.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=torch.float32, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end, i].transpose(0, 1) for i in range(3))  # each [heads, L, d]
        s = (q @ k.transpose(1, 2)) * scale  # [heads, L, L]
        if rel is not None:
            s = s + relative_score_terms(q[None], k[None], rel, max_seqlen, scale)[0]
        p = torch.softmax(s, dim=-1)  # [heads, L, L]
        out[start:end] = (p @ v).transpose(0, 1)  # [L, heads, d]
    return out.reshape(T, H).to(qkv.dtype)


def add_bias_residual_layer_norm_ref(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                     weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)`` over the last dim, fp32 statistics; ``[T, H]`` in x's dtype."""
    y = x.float() + residual.float() + (0 if bias is None else bias.float())
    return F.layer_norm(y, y.shape[-1:], weight.float(), ln_bias.float(), eps).to(x.dtype)


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(x + bias)`` in fp32; ``[T, F]`` in x's dtype."""
    y = x.float() + (0 if bias is None else bias.float())
    return apply_activation(y, activation).to(x.dtype)


def embed_layer_norm_ref(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                         token_type_ids: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor | None,
                         token_type: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``; tables ``[rows, E]``; returns ``[T, E]``.

    ``position``/``token_type`` may be None for families without them.
    """
    y = word[input_ids].float()
    if position is not None:
        y = y + position[position_ids].float()
    if token_type is not None:
        y = y + token_type[token_type_ids].float()
    return F.layer_norm(y, y.shape[-1:], weight.float(), bias.float(), eps).to(word.dtype)
