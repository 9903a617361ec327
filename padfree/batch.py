"""PackedBatch: the one data structure that flows through padfree.

Valid tokens of a batch of variable-length sequences are packed once into flat ``[T]`` tensors
(T = number of real tokens). ``cu_seqlens`` (prefix sum of the lengths) says where each sequence starts.
Padding is rebuilt only by :meth:`PackedBatch.unpack`, when a caller asks for ``[B, S, H]`` output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class HostLayout:
    """What the host knows of a batch's layout, computed once where the lengths are known (no device read).

    The forward reads it instead of ``cu_seqlens`` (no host sync, no cache): the CPU attention's runs of
    equal lengths come from here. Built by the constructors of :class:`PackedBatch`, by
    :meth:`PackedBatch.validate` for a batch built by hand, and by the CUDA-graph runner for its static layout.
    """
    lengths: tuple[int, ...]
    """``[B]`` host ints, the length of each sequence slot (0 only in the CUDA-graph runner's unused slots)."""
    runs: tuple[tuple[int, int, int], ...]
    """``(first token, number of sequences, length)`` of each run of consecutive equal lengths."""

    @classmethod
    def of(cls, lengths: Sequence[int]) -> "HostLayout":
        runs: list[tuple[int, int, int]] = []
        start = 0
        for n in lengths:
            if runs and runs[-1][2] == n:
                first, count, _ = runs[-1]
                runs[-1] = (first, count + 1, n)
            else:
                runs.append((start, 1, n))
            start += n
        return cls(tuple(lengths), tuple(runs))


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor
    """``[T]`` int64: token ids of the real tokens, sequence after sequence."""
    token_type_ids: torch.Tensor
    """``[T]`` int64: segment ids (zeros when the caller gave none)."""
    position_ids: torch.Tensor
    """``[T]`` int64: position of each token inside its own sequence, restarting at 0. A model's position
    offset (RoBERTa's ``padding_idx + 1``) is applied by the model, so one batch serves every family."""
    cu_seqlens: torch.Tensor
    """``[B+1]`` int32: prefix sum of the sequence lengths; sequence b is tokens ``cu_seqlens[b]:cu_seqlens[b+1]``."""
    max_seqlen: int
    """Length of the longest sequence, a host int (computed while batching, never by a device sync later)."""
    pad_index: torch.Tensor | None = None
    """``[T]`` int64, only for batches built from a padded tensor: where each packed token sits in ``[B*S]``."""
    padded_shape: tuple[int, int] | None = None
    """``(B, S)`` of the padded tensor the batch came from, if any."""
    host: HostLayout | None = field(default=None, repr=False, compare=False)
    """The lengths and runs on the host. Leave it out when building a batch by hand: the fields are then
    checked against each other (:meth:`validate`) and it is filled in. padfree's own constructors pass it."""

    def __post_init__(self):
        if self.host is None:  # built by hand: check once, here, not in the forward
            object.__setattr__(self, "host", self.validate())

    def validate(self) -> HostLayout:
        """Check a hand-built batch's fields against each other; ``ValueError`` naming the first broken rule.

        Reads ``cu_seqlens`` on the host once (on a GPU, the one sync of building a batch by hand; the
        constructors, :meth:`to` and the CUDA-graph runner pass their :class:`HostLayout` and never pay it)."""
        T = self.input_ids.shape[0] if self.input_ids.dim() == 1 else -1
        for name in ("input_ids", "token_type_ids", "position_ids"):
            t = getattr(self, name)
            if t.dim() != 1 or t.shape[0] != T or t.dtype.is_floating_point or t.dtype == torch.bool:
                raise ValueError(f"{name} must be a 1-D integer tensor of T = {T} tokens (like input_ids); "
                                 f"got {t.dtype} {tuple(t.shape)}")
        cu = self.cu_seqlens
        if cu.dim() != 1 or cu.shape[0] < 2 or cu.dtype != torch.int32:
            raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of B + 1 >= 2 offsets; got {cu.dtype} "
                             f"{tuple(cu.shape)}")
        devices = {str(getattr(self, n).device) for n in ("input_ids", "token_type_ids", "position_ids",
                                                           "cu_seqlens")}
        if len(devices) > 1:
            raise ValueError(f"every tensor of a batch must be on one device; got {sorted(devices)}")
        bounds = cu.tolist()
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != T:
            raise ValueError(f"cu_seqlens must run from 0 to T = {T} (the number of tokens); got "
                             f"{bounds[0]} .. {bounds[-1]}")
        short = [b for b, n in enumerate(lengths) if n < 1]
        if short:
            raise ValueError(f"sequences {short[:10]} have length {[lengths[b] for b in short[:10]]} in cu_seqlens;"
                             f" every sequence needs >= 1 token")
        if isinstance(self.max_seqlen, bool) or not isinstance(self.max_seqlen, int) \
                or self.max_seqlen != max(lengths):
            raise ValueError(f"max_seqlen must be the longest length in cu_seqlens, {max(lengths)}, as a host int; "
                             f"got {self.max_seqlen!r}")
        if (self.pad_index is None) != (self.padded_shape is None):
            raise ValueError("pad_index and padded_shape go together: give both or neither")
        if self.pad_index is not None and (tuple(self.pad_index.shape) != (T,) or len(self.padded_shape) != 2
                                           or self.padded_shape[0] != len(lengths)
                                           or self.padded_shape[1] < self.max_seqlen):
            raise ValueError(f"pad_index must be [T] = [{T}] and padded_shape (B, S) with B = {len(lengths)}, "
                             f"S >= {self.max_seqlen}; got {tuple(self.pad_index.shape)} and {self.padded_shape}")
        return HostLayout.of(lengths)

    @property
    def runs(self) -> tuple[tuple[int, int, int], ...]:
        """``(first token, number of sequences, length)`` of each run of consecutive equal lengths (host)."""
        return self.host.runs

    @property
    def num_tokens(self) -> int:
        """T, the number of real tokens."""
        return self.input_ids.shape[0]

    @property
    def batch_size(self) -> int:
        """B, the number of sequences."""
        return self.cu_seqlens.shape[0] - 1

    @property
    def seqlens(self) -> torch.Tensor:
        """``[B]`` int64 lengths."""
        return self.cu_seqlens.diff().long()

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with every tensor on ``device`` (host ints stay)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.token_type_ids), move(self.position_ids),
                           move(self.cu_seqlens), self.max_seqlen, move(self.pad_index), self.padded_shape,
                           self.host)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_padded(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None) -> "PackedBatch":
        """Pack a padded batch. ``input_ids``, ``attention_mask`` (and ``token_type_ids``, ``position_ids``):
        ``[B, S]``.

        The mask may use any padding side, or any 0/1 pattern: its ones are the real tokens, taken in order.
        Positions restart at 0 at each row's first real token unless ``position_ids`` gives them (padfree's
        numbering, before the model's offset: see :meth:`padfree.Encoder.forward` for transformers' rows).
        Raises ``ValueError`` for shape mismatches, a mask with values other than 0/1, or a row with no real token.
        """
        input_ids, attention_mask = torch.as_tensor(input_ids), torch.as_tensor(attention_mask)
        token_type_ids, position_ids = (None if t is None else torch.as_tensor(t)
                                        for t in (token_type_ids, position_ids))
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, seq]; got shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match "
                             f"input_ids shape {tuple(input_ids.shape)}")
        for name, t in (("token_type_ids", token_type_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} shape {tuple(t.shape)} does not match "
                                 f"input_ids shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor; got {input_ids.dtype}")
        B, S = input_ids.shape
        if B == 0:
            raise ValueError("empty batch: input_ids has no rows")
        # packed on the host, in numpy: a dozen small torch ops cost ~5 us each of dispatch, numpy's ~1 (a batch-1
        # call packed in 21 us instead of 49); a batch on a GPU is copied to the host and its packed tensors back
        mask = _host(attention_mask)
        # checked on the given values, before any cast: a float 0.5 must not become a silent 0 (padding)
        if mask.dtype != np.bool_:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("attention_mask must contain only 0 and 1 (1 = real token); "
                                 f"found values {sorted(set(np.unique(mask).tolist()) - {0, 1})[:5]}")
            mask = mask.astype(np.bool_)
        lengths = mask.sum(axis=1)  # [B]
        lengths_host = lengths.tolist()
        empty_rows = [b for b, n in enumerate(lengths_host) if n == 0]
        if empty_rows:
            raise ValueError(f"attention_mask rows {empty_rows[:10]} have no real token; every sequence needs >= 1")
        pad_index = np.flatnonzero(mask)  # [T] positions of real tokens in [B*S], row-major order
        if position_ids is None:
            positions = (np.cumsum(mask, axis=1, dtype=np.int64) - 1).reshape(-1)[pad_index]  # from 0 in each row
        else:
            positions = _host(position_ids).reshape(-1)[pad_index].astype(np.int64)
        ids = _host(input_ids).reshape(-1)[pad_index].astype(np.int64)
        types = (_host(token_type_ids).reshape(-1)[pad_index].astype(np.int64) if token_type_ids is not None
                 else np.zeros_like(ids))
        cu = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        batch = cls(*(torch.from_numpy(a) for a in (ids, types, positions, cu)), max(lengths_host),
                    torch.from_numpy(pad_index), (B, S), HostLayout.of(lengths_host))
        return batch if input_ids.device.type == "cpu" else batch.to(input_ids.device)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]],
                       token_type_ids: Sequence[Sequence[int]] | None = None,
                       device: torch.device | str = "cpu") -> "PackedBatch":
        """Pack a list of token-id lists (each one sequence, no padding)."""
        if len(sequences) == 0:
            raise ValueError("empty batch: no sequences given")
        lengths = [len(s) for s in sequences]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:
            raise ValueError(f"sequences {empty[:10]} are empty; every sequence needs >= 1 token")
        if token_type_ids is not None:
            if [len(t) for t in token_type_ids] != lengths:
                raise ValueError("token_type_ids must have exactly one entry per token of each sequence")
            types = torch.tensor([t for seq in token_type_ids for t in seq], dtype=torch.int64)
        ids = torch.tensor([t for seq in sequences for t in seq], dtype=torch.int64)
        if token_type_ids is None:
            types = torch.zeros_like(ids)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        positions = torch.cat([torch.arange(n) for n in lengths])
        batch = cls(ids, types, positions, cu, max(lengths), host=HostLayout.of(lengths))
        return batch if torch.device(device).type == "cpu" else batch.to(device)

    # ------------------------------------------------------------------ unpacking
    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Scatter packed ``[T, ...]`` back to padded ``[B, S, ...]`` with zeros at pads.

        For a batch built by :meth:`from_sequences`, S is ``max_seqlen`` and padding is on the right.
        """
        if x.shape[0] != self.num_tokens:
            raise ValueError(f"unpack expects {self.num_tokens} packed rows, got {x.shape[0]}")
        if self.pad_index is not None:
            B, S = self.padded_shape
            index = self.pad_index
        else:
            B, S = self.batch_size, self.max_seqlen
            starts = self.cu_seqlens[:-1].long().repeat_interleave(self.seqlens, output_size=self.num_tokens)
            seq = torch.arange(B, device=x.device).repeat_interleave(self.seqlens, output_size=self.num_tokens)
            index = seq * S + (torch.arange(self.num_tokens, device=x.device) - starts)
        out = x.new_zeros((B * S,) + tuple(x.shape[1:]))  # [B*S, ...]
        out[index] = x
        return out.view((B, S) + tuple(x.shape[1:]))

    def sequence_index(self) -> torch.Tensor:
        """``[T]`` int64: the sequence each packed token belongs to."""
        B = self.batch_size
        return torch.arange(B, device=self.cu_seqlens.device).repeat_interleave(
            self.seqlens, output_size=self.num_tokens)


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as a host numpy array; fp16/bf16 as fp32 (numpy has no bf16), exactly."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.cpu().numpy()
