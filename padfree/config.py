"""ModelConfig: the facts of a checkpoint (from its ``config.json``), frozen after construction.

Runtime choices (device, dtype, backend, batch budget) are not here: they belong to the objects that run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    family: str                    # padfree family name ("bert", "roberta", ...)
    vocab_size: int                # rows of the word-embedding table
    hidden_size: int               # H, width of every token's hidden state
    num_layers: int                # number of post-LN encoder layers
    num_heads: int                 # attention heads; head size = H / heads
    intermediate_size: int         # F, FFN inner width
    max_position_embeddings: int   # rows of the position table (including any offset rows)
    type_vocab_size: int           # rows of the token-type table; 0 = the family has none
    layer_norm_eps: float          # epsilon of every LayerNorm
    activation: str                # canonical FFN activation (see padfree.ops.activations)
    position_offset: int = 0       # first position row used (RoBERTa: padding_idx + 1)
    pad_token_id: int | None = None  # the tokenizer's pad id (informational; padding is never computed)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} leaves no position after "
                             f"the offset {self.position_offset}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the position table can encode."""
        return self.max_position_embeddings - self.position_offset
