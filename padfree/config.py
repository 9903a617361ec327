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
    num_layers: int                # number of encoder layers (post-LN unless pre_norm)
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
    pre_norm: bool = False             # pre-LN layers, x + attn(norm(x)) and x + ffn(norm(x)), then a final
                                       # LayerNorm after the last layer (ModernBERT); else post-LN (BERT)
    first_attn_norm: bool = True       # pre-LN: layer 0 normalises its attention input (ModernBERT: no, the
                                       # embeddings' LayerNorm precedes it)
    norm_bias: bool = True             # every LayerNorm has a bias (ModernBERT norm_bias=false: none)
    attention_bias: bool = True        # QKV and attention-output linears have biases (ModernBERT attention_bias)
    ffn_bias: bool = True              # FFN linears have biases (ModernBERT mlp_bias)
    gated_ffn: bool = False            # the FFN input linear makes [input | gate] (2F wide): act(input) * gate
                                       # feeds the output linear (ModernBERT's GeGLU; NomicBERT's SwiGLU, post-LN)
    rotary_theta: float = 0.0          # RoPE base of the global layers' Q and K; 0 = no rotary embedding
                                       # (pre- or post-LN: NomicBERT rotates in post-LN layers)
    local_rotary_theta: float = 0.0    # RoPE base of the local (sliding-window) layers
    local_layers: tuple[int, ...] = ()  # layers that attend within a window (ModernBERT: every layer but each
                                        # global_attn_every_n_layers-th)
    local_window: int = 0              # local layers: query i sees key j iff |i - j| <= local_window
                                       # (ModernBERT: local_attention // 2)
    rms_norm: bool = False             # every norm is RMSNorm, x / sqrt(mean(x^2) + eps) * weight: no mean, no bias
                                       # (EuroBERT); pre_norm layers only
    embedding_norm: bool = True        # a LayerNorm follows the embeddings (EuroBERT: none, layer 0's norm is first)
    kv_heads: int = 0                  # the checkpoint's K and V heads when fewer than num_heads (grouped-query
                                       # attention, EuroBERT-610m/2.1B); 0 = as many as Q. Each is repeated at load
                                       # for the query heads it serves, so the encoder runs plain multi-head attention

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.kv_heads and (self.kv_heads > self.num_heads or self.num_heads % self.kv_heads):
            raise ValueError(f"num_key_value_heads {self.kv_heads} must divide num_attention_heads {self.num_heads}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_position_embeddings {self.max_position_embeddings} leaves no position after "
                             f"the offset {self.position_offset}")
        if self.relative_attention not in ("none", "bias", "disentangled"):
            raise ValueError(f"relative_attention must be 'none', 'bias' or 'disentangled'; "
                             f"got {self.relative_attention!r}")
        bad = [t for t in self.pos_att_type if t not in ("c2p", "p2c")]
        if bad:
            raise ValueError(f"unsupported pos_att_type {bad}; padfree supports 'c2p' and 'p2c'")
        if any(not 0 <= i < self.num_layers for i in self.local_layers) or (self.local_layers
                                                                             and self.local_window < 1):
            raise ValueError(f"local_layers {self.local_layers} need layers in 0..{self.num_layers - 1} and a "
                             f"local_window >= 1; got {self.local_window}")
        pre_only = [n for n, on in (("local_layers", bool(self.local_layers)),
                                    ("first_attn_norm=False", not self.first_attn_norm),
                                    ("rms_norm", self.rms_norm), ("embedding_norm=False", not self.embedding_norm))
                    if on]
        if pre_only and not self.pre_norm:  # the post-LN layer does not read them: refuse, never ignore
            raise ValueError(f"{', '.join(pre_only)} need pre_norm layers")
        if self.rms_norm and self.norm_bias:
            raise ValueError("rms_norm has no bias: it needs norm_bias=False")
        if (self.pre_norm or self.rotary_theta > 0) and self.relative_attention != "none":
            raise ValueError("relative_attention is not supported with pre_norm layers or rotary_theta")
        if self.local_layers and self.rotary_theta > 0 and self.local_rotary_theta <= 0:
            raise ValueError("local layers of a rotary model need local_rotary_theta > 0")
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
    def features(self) -> frozenset[str]:
        """What this model needs from the ops beyond BERT's (checked by the backend registry)."""
        return frozenset(name for name, on in (("rotary", self.rotary_theta > 0),
                                               ("sliding_window", bool(self.local_layers)),
                                               ("gated_ffn", self.gated_ffn),
                                               ("norm_without_bias", not self.norm_bias),
                                               ("rms_norm", self.rms_norm)) if on)

    def window(self, layer: int) -> int | None:
        """The attention half-window of parameter layer ``layer``; None = the whole sequence."""
        return self.local_window if layer in self.local_layers else None

    def theta(self, layer: int) -> float:
        """The RoPE base of parameter layer ``layer`` (0 = none)."""
        return self.local_rotary_theta if layer in self.local_layers and self.rotary_theta > 0 else self.rotary_theta

    @property
    def attention_scale(self) -> float:
        """Factor on ``q.k`` (and on DeBERTa's position terms): ``1/sqrt(d * (1 + len(pos_att_type)))``."""
        return 1.0 / math.sqrt(self.head_dim * (1 + len(self.pos_att_type)))

    @property
    def max_sequence_length(self) -> int:
        """Longest sequence the position table can encode."""
        return self.max_position_embeddings - self.position_offset
