"""ModelConfig: the facts of a checkpoint (from its ``config.json``), frozen after construction.

Runtime choices (device, dtype, backend, batch budget) are not here: they belong to the objects that run.
"""
from __future__ import annotations

import math
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
    # ---- family differences, all declarative; the defaults describe BERT
    embedding_size: int | None = None  # E, width of the embedding tables; None = hidden_size. When E != H a
                                       # projection E -> H follows the embeddings (ALBERT, ELECTRA, DeBERTa)
    embedding_projection_bias: bool = True  # the E -> H projection has a bias (ALBERT, ELECTRA; DeBERTa: none)
    always_project_embeddings: bool = False  # the projection runs even when E == H (ALBERT: HF always applies
                                             # embedding_hidden_mapping_in; ELECTRA and DeBERTa only when E != H)
    norm_after_projection: bool = False  # embedding LayerNorm over H after the projection (DeBERTa) instead of
                                         # over E before it (ALBERT, ELECTRA, BERT)
    absolute_positions: bool = True    # the embeddings add an absolute position table (DeBERTa-v3: no,
                                       # position_biased_input=false; relative attention carries position)
    layer_schedule: tuple[int, ...] | None = None  # parameter layer run at each depth; None = layers
                                                   # 0..num_layers-1 once each (ALBERT reuses shared layers)
    layer_group_size: int = 1          # ALBERT inner_group_num: parameter layers per shared group (the
                                       # checkpoint stores layer i as group i // size, inner layer i % size)
    relative_attention: str = "none"   # additive per-sequence score terms: "none"; "bias" (MPNet: a bucketed
                                       # bias table shared by all layers); "disentangled" (DeBERTa c2p/p2c)
    relative_buckets: int = 0          # MPNet: rows of the bias table; DeBERTa: position_buckets (0 = plain
                                       # clamped distances, no log buckets)
    max_relative_positions: int = 0    # MPNet: max_distance of its log buckets (128); DeBERTa: distance at
                                       # which the log buckets saturate (max_relative_positions)
    pos_att_type: tuple[str, ...] = ()  # DeBERTa: disentangled terms used, a subset of ("c2p", "p2c");
                                        # each also widens the score scale to 1/sqrt(d * (1 + len))
    share_att_key: bool = False        # DeBERTa: positions are projected by the layer's own query/key weights
                                       # (else by per-layer pos_key_proj / pos_query_proj)
    norm_rel_embeddings: bool = False  # DeBERTa: LayerNorm over the relative embedding table (norm_rel_ebd)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} leaves no position after "
                             f"the offset {self.position_offset}")
        if self.relative_attention not in ("none", "bias", "disentangled"):
            raise ValueError(f"relative_attention must be 'none', 'bias' or 'disentangled'; "
                             f"got {self.relative_attention!r}")
        bad = [t for t in self.pos_att_type if t not in ("c2p", "p2c")]
        if bad:
            raise ValueError(f"unsupported pos_att_type {bad}; padfree supports 'c2p' and 'p2c'")
        if self.layer_schedule is not None and any(not 0 <= i < self.num_layers for i in self.layer_schedule):
            raise ValueError(f"layer_schedule {self.layer_schedule} names layers outside 0..{self.num_layers - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        """E, the width of the embedding tables."""
        return self.embedding_size or self.hidden_size

    @property
    def has_embedding_projection(self) -> bool:
        """An E -> H linear follows the embeddings (always for ALBERT; when E != H for ELECTRA and DeBERTa)."""
        return self.always_project_embeddings or self.embedding_width != self.hidden_size

    @property
    def schedule(self) -> tuple[int, ...]:
        """The parameter layer run at each depth, in order."""
        return tuple(range(self.num_layers)) if self.layer_schedule is None else self.layer_schedule

    @property
    def attention_scale(self) -> float:
        """Factor on ``q.k`` (and on DeBERTa's position terms): ``1/sqrt(d * (1 + len(pos_att_type)))``."""
        return 1.0 / math.sqrt(self.head_dim * (1 + len(self.pos_att_type)))

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the position table can encode."""
        return self.max_position_embeddings - self.position_offset
