"""Rotary position embeddings (RoPE) on packed Q and K, with per-sequence positions.

A token at position p (inside its own sequence, as ``PackedBatch.position_ids`` counts) has each pair
``(x[m], x[m + d/2])`` of its query and key heads rotated by the angle ``p * theta ** (-2m / d)`` (the
"rotate half" pairing ModernBERT, NomicBERT and transformers use). The tables are ``[T, d/2]``: one row per
packed token, never a padded ``[B, S]`` tensor. Since a rotation by p then q . k depends only on the distance
between the two tokens, any numbering that restarts at each sequence gives the same scores.
"""
from __future__ import annotations

import torch


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[T, head_dim / 2]`` fp32, for the packed ``positions [T]``."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [..., d]`` rotated pairwise (``(x[m], x[m + d/2])`` by the angles of ``cos``/``sin``, broadcastable to
    ``[..., d/2]``): a new tensor in x's dtype, computed in fp32 and rounded once."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lo, hi = (x1 * cos).addcmul_(x2, sin, value=-1), (x2 * cos).addcmul_(x1, sin)
    out[..., :half] = lo
    out[..., half:] = hi
    return out


def apply_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``qkv [T, 3H]`` (Q | K | V, bias included) with Q and K rotated: a new ``[T, 3H]`` in qkv's dtype, the
    rotation computed in fp32; V is copied unchanged."""
    T = qkv.shape[0]
    x = qkv.view(T, 3, num_heads, -1)
    out = torch.empty_like(x)
    out[:, :2] = rotate(x[:, :2], cos[:, None, None, :], sin[:, None, None, :])
    out[:, 2] = x[:, 2]
    return out.view(T, -1)
