"""Model families: how each Hugging Face ``model_type`` maps onto padfree's one generic encoder.

A family is data: how to read the config, the checkpoint's prefix, and an explicit table from padfree's
parameter names to the checkpoint's (a tuple of names = concatenated along dim 0, which is how Q, K and V
become one ``[3H, H]`` projection at load time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import ModelConfig
from ..ops.activations import canonical_activation

WeightTable = dict[str, "str | tuple[str, ...]"]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]       # Hugging Face model_type values served by this family
    prefixes: tuple[str, ...]          # base-model prefixes stripped from checkpoint keys ("bert.", ...)
    make_config: Callable[[dict], ModelConfig]
    weight_table: Callable[[ModelConfig], WeightTable]
    optional: tuple[str, ...] = ()     # padfree names that may be absent (e.g. the pooler)


def _bert_like_config(family: str, position_offset: Callable[[dict], int]) -> Callable[[dict], ModelConfig]:
    def make(c: dict) -> ModelConfig:
        if c.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {c['position_embedding_type']!r} is not supported; "
                             "padfree supports 'absolute'")
        return ModelConfig(
            family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
            type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            activation=canonical_activation(c.get("hidden_act", "gelu")), position_offset=position_offset(c),
            pad_token_id=c.get("pad_token_id"))
    return make


def _bert_weights(cfg: ModelConfig) -> WeightTable:
    table: WeightTable = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "pooler.weight": "pooler.dense.weight",
        "pooler.bias": "pooler.dense.bias",
    }
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}."
        pf = f"layers.{i}."
        for p in ("weight", "bias"):
            table[pf + "qkv." + p] = tuple(f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value"))
            table[pf + "attn_out." + p] = f"{hf}attention.output.dense.{p}"
            table[pf + "attn_norm." + p] = f"{hf}attention.output.LayerNorm.{p}"
            table[pf + "ffn_in." + p] = f"{hf}intermediate.dense.{p}"
            table[pf + "ffn_out." + p] = f"{hf}output.dense.{p}"
            table[pf + "ffn_norm." + p] = f"{hf}output.LayerNorm.{p}"
    return table


FAMILIES: list[Family] = [
    Family("bert", ("bert",), ("bert.",), _bert_like_config("bert", lambda c: 0), _bert_weights,
           optional=("pooler.weight", "pooler.bias")),
    # RoBERTa numbers positions from padding_idx + 1; its token-type table has one row.
    Family("roberta", ("roberta", "xlm-roberta", "camembert"), ("roberta.",),
           _bert_like_config("roberta", lambda c: c.get("pad_token_id", 1) + 1), _bert_weights,
           optional=("pooler.weight", "pooler.bias")),
]


def family_for(model_type: str) -> Family:
    """The family serving ``model_type``; ``ValueError`` listing the supported types otherwise."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; padfree supports {supported}")
