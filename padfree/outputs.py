"""Output objects of the Hugging Face-compatible calls, with the attribute names transformers users write.

Like transformers' ``ModelOutput`` they read by attribute (``out.logits``), by key (``out["logits"]``) or by
position over the fields that are set (``out[0]``, ``out.to_tuple()``), so code written against transformers
keeps working. They are plain dataclasses: importing them does not import transformers.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


class _Output:
    def to_tuple(self) -> tuple:
        """The fields that are not None, in order (transformers' convention)."""
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def __getitem__(self, key: int | str):
        if isinstance(key, str):
            if key not in {f.name for f in fields(self)} or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class EncoderOutput(_Output):
    last_hidden_state: torch.Tensor            # [B, S, H], zeros at pad positions
    pooler_output: torch.Tensor | None = None  # [B, H] when the checkpoint has a pooler


@dataclass
class SequenceClassifierOutput(_Output):
    logits: torch.Tensor  # [B, num_labels] fp32


@dataclass
class TokenClassifierOutput(_Output):
    logits: torch.Tensor  # [B, S, num_labels] fp32, zeros at pad positions
