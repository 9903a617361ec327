"""Pooling of packed hidden states ``[T, H]`` into one vector per sequence ``[B, H]``, as segment ops
over ``cu_seqlens`` (no padded tensor is built)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch import PackedBatch

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """``[T, H]`` -> ``[B, H]`` (computed in fp32, returned in fp32)."""
    starts = batch.cu_seqlens[:-1].long()
    if mode == "cls":
        return hidden[starts].float()
    if mode == "lasttoken":
        return hidden[batch.cu_seqlens[1:].long() - 1].float()
    seq = batch.sequence_index()  # [T]
    B, H = batch.batch_size, hidden.shape[1]
    if mode == "max":
        out = hidden.new_full((B, H), float("-inf"), dtype=torch.float32)
        return out.scatter_reduce_(0, seq[:, None].expand(-1, H), hidden.float(), "amax")
    sums = torch.zeros(B, H, dtype=torch.float32, device=hidden.device).index_add_(0, seq, hidden.float())
    n = batch.seqlens.to(torch.float32)[:, None]  # [B, 1]
    if mode == "mean":
        return sums / n
    if mode == "mean_sqrt_len":
        return sums / n.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit L2 norm along the last dim."""
    return F.normalize(x, p=2, dim=-1)
