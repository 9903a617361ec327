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
class HeadSpec:
    """A sequence-classification head as the checkpoint stores it: ``out(act(dense(h_first)))``.

    ``dense``/``out`` are checkpoint key prefixes (full names, e.g. ``"classifier.dense"``); ``dense`` None
    means the classifier reads the first token's hidden state directly. ModernBERT adds a LayerNorm after the
    activation (``norm``) and may pool by the mean of each sequence's tokens instead of its first."""
    dense: str | None
    activation: str   # "tanh" or a canonical activation after ``dense`` (see head_activation)
    out: str
    norm: str | None = None  # a LayerNorm (checkpoint key prefix; bias optional) after the activation
    pooling: str = "first"   # "first": each sequence's first real token; "mean": the mean of its tokens; "none":
                             # every token (a token-classification head)


@dataclass(frozen=True)
class MLMHeadSpec:
    """A masked-LM head as the checkpoint stores it: ``decoder(norm(act(dense(h)))) + bias`` on every token.

    Full checkpoint key prefixes; ``decoder`` is read if the checkpoint holds it, else tied to the encoder's word
    embeddings, as transformers ties them; ``bias`` is the vocabulary bias ``[V]``. ``activation``: a
    config key holding the activation's name, or ``"=name"`` for one fixed in the model's code."""
    dense: str
    activation: str
    norm: str
    decoder: str
    bias: str


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]       # Hugging Face model_type values served by this family
    prefixes: tuple[str, ...]          # base-model prefixes stripped from checkpoint keys ("bert.", ...)
    make_config: Callable[[dict], ModelConfig]
    weight_table: Callable[[ModelConfig], WeightTable]
    optional: tuple[str, ...] = ()     # padfree names that may be absent (e.g. the pooler)
    ignored: tuple[str, ...] = ("embeddings.position_ids", "embeddings.token_type_ids")
    # base-model checkpoint keys padfree may leave unused: buffers HF rebuilds (not weights). Any other base key
    # the weight table does not use is an error at load time, so no family can drop a weight silently.
    sequence_head: Callable[[dict], HeadSpec] | None = None  # the *ForSequenceClassification head
    token_head: "str | Callable[[dict], HeadSpec] | None" = "classifier"  # the *ForTokenClassification head: its
    # linear layer's key prefix, or a HeadSpec (dense, activation, norm, out) applied to every token (ModernBERT)
    mlm_head: MLMHeadSpec | None = None  # the *ForMaskedLM head (SPLADE sparse embeddings)
    other_layout: Callable[[ModelConfig], WeightTable] | None = None  # the same weights under other names
    # (NomicBERT: transformers' module names in memory, the hub's on disk); the loader reads the table that fits
    lora_targets: "Callable[[ModelConfig], dict[str, tuple[str, ...]]] | None" = None
    # task LoRA adapters (jina-embeddings-v3): padfree weight -> the checkpoint modules whose adapters make its
    # delta (several: stacked along dim 0, as Q | K | V); see padfree.lora


def head_activation(name: str) -> str:
    """A classifier head's activation: tanh (not an FFN activation, so not a kernel op) or a canonical one."""
    return "tanh" if name == "tanh" else canonical_activation(name)


def _check_absolute(c: dict) -> None:
    kind = c.get("position_embedding_type") or "absolute"
    if kind != "absolute":
        raise ValueError(f"position_embedding_type {kind!r} is not supported; padfree supports 'absolute'")


def _bert_like_config(family: str, position_offset: Callable[[dict], int]) -> Callable[[dict], ModelConfig]:
    def make(c: dict) -> ModelConfig:
        _check_absolute(c)
        return ModelConfig(
            family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
            type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            activation=canonical_activation(c.get("hidden_act", "gelu")), position_offset=position_offset(c),
            pad_token_id=c.get("pad_token_id"), embedding_size=c.get("embedding_size"))  # ELECTRA: E
    return make


def _distilbert_config(c: dict) -> ModelConfig:
    return ModelConfig(
        family="distilbert", vocab_size=c["vocab_size"], hidden_size=c["dim"], num_layers=c["n_layers"],
        num_heads=c["n_heads"], intermediate_size=c["hidden_dim"],
        max_position_embeddings=c["max_position_embeddings"],
        type_vocab_size=0,     # DistilBERT has no token types
        layer_norm_eps=1e-12,  # fixed in DistilBERT's code, not in its config
        activation=canonical_activation(c.get("activation", "gelu")), pad_token_id=c.get("pad_token_id"))


def _albert_config(c: dict) -> ModelConfig:
    _check_absolute(c)
    n, groups, inner = c["num_hidden_layers"], c.get("num_hidden_groups", 1), c.get("inner_group_num", 1)
    # HF: depth i runs every inner layer of group int(i / (n / groups)); parameter layer = group * inner + j
    schedule = tuple(int(i / (n / groups)) * inner + j for i in range(n) for j in range(inner))
    return ModelConfig(
        family="albert", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=groups * inner,
        num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"], type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        activation=canonical_activation(c.get("hidden_act", "gelu_new")), pad_token_id=c.get("pad_token_id"),
        embedding_size=c.get("embedding_size", 128), layer_schedule=schedule, layer_group_size=inner,
        always_project_embeddings=True)  # HF's embedding_hidden_mapping_in runs whatever E and H are


def _mpnet_config(c: dict) -> ModelConfig:
    buckets = c.get("relative_attention_num_buckets", 32)
    if buckets != 32:  # HF computes MPNet's buckets with a hard-coded 32 whatever the table size
        raise ValueError(f"relative_attention_num_buckets {buckets} is not supported; MPNet uses 32")
    return ModelConfig(
        family="mpnet", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"], max_position_embeddings=c["max_position_embeddings"],
        type_vocab_size=0, layer_norm_eps=c.get("layer_norm_eps", 1e-12),
        activation=canonical_activation(c.get("hidden_act", "gelu")),
        position_offset=2,  # HF MPNet numbers positions from its hard-coded padding_idx 1, plus 1
        pad_token_id=c.get("pad_token_id"), relative_attention="bias", relative_buckets=buckets,
        max_relative_positions=128)  # HF's max_distance of the buckets


def _deberta_v2_config(c: dict) -> ModelConfig:
    if (c.get("conv_kernel_size") or 0) > 0:
        raise ValueError("DeBERTa's convolution layer (conv_kernel_size > 0, e.g. deberta-v2-xlarge) is not "
                         "supported")
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("attention_head_size") not in (None, H // heads):
        raise ValueError(f"attention_head_size {c['attention_head_size']} != hidden_size / heads is not supported")
    pos_att_type = c.get("pos_att_type") or ()
    if isinstance(pos_att_type, str):
        pos_att_type = [t.strip() for t in pos_att_type.lower().split("|") if t.strip()]
    norm_rel = [t.strip() for t in (c.get("norm_rel_ebd") or "none").lower().split("|")]
    max_rel = c.get("max_relative_positions") or -1
    return ModelConfig(
        family="deberta-v2", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["num_hidden_layers"],
        num_heads=heads, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"], type_vocab_size=c.get("type_vocab_size", 0),
        layer_norm_eps=c.get("layer_norm_eps", 1e-7), activation=canonical_activation(c.get("hidden_act", "gelu")),
        pad_token_id=c.get("pad_token_id"), embedding_size=c.get("embedding_size"),
        embedding_projection_bias=False, norm_after_projection=True,
        absolute_positions=c.get("position_biased_input", True),
        relative_attention="disentangled" if c.get("relative_attention") else "none",
        relative_buckets=max(c.get("position_buckets") or -1, 0),
        max_relative_positions=max_rel if max_rel >= 1 else c["max_position_embeddings"],
        pos_att_type=tuple(pos_att_type), share_att_key=bool(c.get("share_att_key")),
        norm_rel_embeddings="layer_norm" in norm_rel)


_ROPE_THETA = {"full_attention": 160000.0, "sliding_attention": 10000.0}  # HF's defaults (global, local)
_LAYER_TYPE_KEYS = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}


def _modernbert_config(c: dict) -> ModelConfig:
    n = c["num_hidden_layers"]
    every = c.get("global_attn_every_n_layers", 3)
    types = c.get("layer_types") or ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    bad = sorted(set(types) - set(_ROPE_THETA))
    if bad or len(types) != n:
        raise ValueError(f"ModernBERT layer_types {types} are not supported: padfree needs {n} entries (one per "
                         f"layer), each 'full_attention' or 'sliding_attention'")
    if c.get("rope_scaling"):
        raise ValueError(f"ModernBERT rope_scaling {c['rope_scaling']!r} is not supported")
    theta = {}
    for kind in _ROPE_THETA:  # transformers 5 saves rope_parameters per layer type; older configs the thetas
        params = (c.get("rope_parameters") or {}).get(kind) or {}
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"ModernBERT rope_type {params['rope_type']!r} ({kind}) is not supported; padfree "
                             f"supports 'default'")
        theta[kind] = float(params.get("rope_theta") or c.get(_LAYER_TYPE_KEYS[kind]) or _ROPE_THETA[kind])
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, H // heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
    return ModelConfig(
        family="modernbert", vocab_size=c["vocab_size"], hidden_size=H, num_layers=n, num_heads=heads,
        intermediate_size=c["intermediate_size"], max_position_embeddings=c.get("max_position_embeddings", 8192),
        type_vocab_size=0, layer_norm_eps=c.get("norm_eps", 1e-5),
        activation=canonical_activation(c.get("hidden_activation", "gelu")), pad_token_id=c.get("pad_token_id"),
        absolute_positions=False,  # positions enter as rotary embeddings of Q and K
        pre_norm=True, first_attn_norm=False, norm_bias=bool(c.get("norm_bias", False)),
        attention_bias=bool(c.get("attention_bias", False)), ffn_bias=bool(c.get("mlp_bias", False)),
        gated_ffn=True, rotary_theta=theta["full_attention"], local_rotary_theta=theta["sliding_attention"],
        local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
        local_window=c.get("local_attention", 128) // 2)  # HF: |i - j| <= local_attention // 2


def _eurobert_config(c: dict) -> ModelConfig:
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, H // heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
    if c.get("rope_scaling"):
        raise ValueError(f"EuroBERT rope_scaling {c['rope_scaling']!r} is not supported")
    rope = c.get("rope_parameters") or {}  # transformers 5; older configs: rope_theta at the top level
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"EuroBERT rope_type {rope['rope_type']!r} is not supported; padfree supports 'default'")
    return ModelConfig(
        family="eurobert", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["num_hidden_layers"],
        num_heads=heads, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 8192), type_vocab_size=0,
        layer_norm_eps=c.get("rms_norm_eps", 1e-5), activation=canonical_activation(c.get("hidden_act", "silu")),
        pad_token_id=c.get("pad_token_id"), absolute_positions=False, embedding_norm=False, pre_norm=True,
        rms_norm=True, norm_bias=False, attention_bias=bool(c.get("attention_bias", False)),
        ffn_bias=bool(c.get("mlp_bias", False)), gated_ffn=True,  # SwiGLU: act(gate_proj x) * up_proj x
        rotary_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
        kv_heads=0 if c.get("num_key_value_heads") in (None, heads) else c["num_key_value_heads"])


# nomic-ai's own config keys (the hub's nomic-embed-text config.json, written for its remote code) -> transformers'
_NOMIC_KEYS = {"n_embd": "hidden_size", "n_head": "num_attention_heads", "n_layer": "num_hidden_layers",
               "n_inner": "intermediate_size", "n_positions": "max_position_embeddings",
               "layer_norm_epsilon": "layer_norm_eps", "rotary_emb_base": "rope_theta"}
# its options whose other values change the computation: (key, the one value padfree supports)
_NOMIC_FIXED = (("activation_function", "swiglu"), ("rotary_emb_fraction", 1.0), ("rotary_emb_interleaved", False),
                ("rotary_scaling_factor", None), ("prenorm", False), ("use_rms_norm", False), ("causal", False),
                ("qkv_proj_bias", False), ("mlp_fc1_bias", False), ("mlp_fc2_bias", False),
                ("rotary_emb_scale_base", None), ("scale_attn_weights", True),
                ("scale_attn_by_inverse_layer_idx", False), ("moe_every_n_layers", 0))


def _nomic_original_config(c: dict) -> dict:
    """nomic-ai's config as transformers' keys; ``ValueError`` naming an option padfree does not run."""
    for key, value in _NOMIC_FIXED:
        if c.get(key, value) != value:
            raise ValueError(f"NomicBERT {key}={c[key]!r} is not supported; padfree supports {value!r}")
    out = {**c, **{new: c[old] for old, new in _NOMIC_KEYS.items() if c.get(old) is not None}, "hidden_act": "silu"}
    out.setdefault("intermediate_size", 4 * out["hidden_size"])
    return out


def _nomic_bert_config(c: dict) -> ModelConfig:
    """transformers' NomicBERT: BERT's post-LN layers with rotary Q/K over the whole head (half-split pairs, base
    ``rope_theta``), SwiGLU, no linear biases, and no position table (word + token type, then LayerNorm)."""
    if "n_embd" in c:
        c = _nomic_original_config(c)
    if c.get("rope_scaling"):
        raise ValueError(f"NomicBERT rope_scaling {c['rope_scaling']!r} is not supported")
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"NomicBERT rope_type {rope['rope_type']!r} is not supported; padfree supports 'default'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"NomicBERT partial_rotary_factor {rope['partial_rotary_factor']} is not supported; "
                         f"padfree rotates the whole head")
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, H // heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
    return ModelConfig(
        family="nomic_bert", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["num_hidden_layers"],
        num_heads=heads, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 2048), type_vocab_size=c.get("type_vocab_size", 2),
        layer_norm_eps=c.get("layer_norm_eps", 1e-12), activation=canonical_activation(c.get("hidden_act", "silu")),
        pad_token_id=c.get("pad_token_id"), absolute_positions=False,  # positions enter as rotary Q and K
        attention_bias=False, ffn_bias=False, gated_ffn=True,
        rotary_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 1000.0))  # HF's default_theta


# jinaai's own config (remote code XLMRobertaFlashConfig, model_type "xlm-roberta" with position_embedding_type
# "rotary"): options that change the computation and the one value padfree runs (getattr defaults of its code)
_JINA_ORIGINAL_FIXED = (("rotary_emb_scale_base", None), ("rotary_emb_interleaved", False),
                        ("load_trained_adapters", True))


def _jina_original_config(c: dict) -> dict:
    """jinaai's config as transformers' keys; ``ValueError`` naming an option padfree does not run. Accepted as
    they do not change the encoder: use_flash_attn / fused_* (kernels), emb_pooler, matryoshka_dimensions,
    truncate_dim, task_instructions (what its ``encode`` does around the encoder), lora_dropout_p."""
    for key, value in _JINA_ORIGINAL_FIXED:
        if c.get(key, value) != value:
            raise ValueError(f"jina-embeddings-v3 {key}={c[key]!r} is not supported; padfree supports {value!r}")
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("rotary_emb_dim") not in (None, H // heads, H / heads):
        raise ValueError(f"jina-embeddings-v3 rotary_emb_dim={c['rotary_emb_dim']!r} is not supported; padfree "
                         f"rotates the whole head ({H // heads})")
    theta = c.get("rotary_emb_base")
    return {**c, "rope_parameters": {"rope_type": "default",
                                     "rope_theta": 10000.0 if theta is None else float(theta)}}  # its default


def _jina_v3_config(c: dict) -> ModelConfig:
    """transformers' jina-embeddings-v3: XLM-RoBERTa's post-LN layers (biases everywhere, GELU FFN) with rotary Q/K
    (whole head, half-split pairs, base ``rope_theta``, 20000 by default) instead of a position table; word +
    token-type embeddings, then LayerNorm. The task LoRA adapters are merged at load (:mod:`padfree.lora`).
    jinaai's own config dialect (``model_type`` "xlm-roberta", ``position_embedding_type`` "rotary") is read too."""
    if c.get("model_type") == "xlm-roberta":
        c = _jina_original_config(c)
    if c.get("rope_scaling"):
        raise ValueError(f"jina-embeddings-v3 rope_scaling {c['rope_scaling']!r} is not supported")
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":  # HF's default RoPE ignores partial_rotary_factor
        raise ValueError(f"jina-embeddings-v3 rope_type {rope['rope_type']!r} is not supported; padfree supports "
                         f"'default'")
    H, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("head_dim") not in (None, H // heads):
        raise ValueError(f"head_dim {c['head_dim']} != hidden_size / heads is not supported")
    for key in ("is_decoder", "add_cross_attention"):  # not attributes of HF's config: refuse, never ignore
        if c.get(key):
            raise ValueError(f"jina-embeddings-v3 {key}=True is not supported")
    return ModelConfig(
        family="jina_embeddings_v3", vocab_size=c["vocab_size"], hidden_size=H, num_layers=c["num_hidden_layers"],
        num_heads=heads, intermediate_size=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 8194), type_vocab_size=c.get("type_vocab_size", 1),
        layer_norm_eps=c.get("layer_norm_eps", 1e-5), activation=canonical_activation(c.get("hidden_act", "gelu")),
        pad_token_id=c.get("pad_token_id"), absolute_positions=False,  # positions enter as rotary Q and K
        rotary_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 20000.0))  # HF's default_theta


LAYER_NAMES = ("qkv", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm")


def _layers(cfg: ModelConfig, prefix: Callable[[int], str], q: str, k: str, v: str, attn_out: str,
            attn_norm: str, ffn_in: str, ffn_out: str, ffn_norm: str) -> WeightTable:
    """The per-layer part of a weight table; ``prefix(i)`` is parameter layer i's checkpoint prefix."""
    table: WeightTable = {}
    for i in range(cfg.num_layers):
        hf, pf = prefix(i), f"layers.{i}."
        for p in ("weight", "bias"):
            table[pf + "qkv." + p] = tuple(f"{hf}{n}.{p}" for n in (q, k, v))
            for name, src in zip(LAYER_NAMES[1:], (attn_out, attn_norm, ffn_in, ffn_out, ffn_norm)):
                table[f"{pf}{name}.{p}"] = f"{hf}{src}.{p}"
    return table


def _embeddings(cfg: ModelConfig, word="embeddings.word_embeddings", position="embeddings.position_embeddings",
                token_type="embeddings.token_type_embeddings", norm="embeddings.LayerNorm",
                project: str | None = None) -> WeightTable:
    table: WeightTable = {"embeddings.word.weight": f"{word}.weight",
                          "embeddings.norm.weight": f"{norm}.weight", "embeddings.norm.bias": f"{norm}.bias"}
    if cfg.absolute_positions:
        table["embeddings.position.weight"] = f"{position}.weight"
    if cfg.type_vocab_size:
        table["embeddings.token_type.weight"] = f"{token_type}.weight"
    if cfg.has_embedding_projection:
        table["embeddings.project.weight"] = f"{project}.weight"
        if cfg.embedding_projection_bias:
            table["embeddings.project.bias"] = f"{project}.bias"
    return table


_BERT_LAYER = dict(q="attention.self.query", k="attention.self.key", v="attention.self.value",
                   attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
                   ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm")


def _bert_weights(cfg: ModelConfig) -> WeightTable:
    table = _embeddings(cfg, project="embeddings_project")  # ELECTRA's projection when E != H
    table.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
    table.update(_layers(cfg, lambda i: f"encoder.layer.{i}.", **_BERT_LAYER))
    return table


def _distilbert_weights(cfg: ModelConfig) -> WeightTable:
    table = _embeddings(cfg)
    table.update(_layers(cfg, lambda i: f"transformer.layer.{i}.", q="attention.q_lin", k="attention.k_lin",
                         v="attention.v_lin", attn_out="attention.out_lin", attn_norm="sa_layer_norm",
                         ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_norm="output_layer_norm"))
    return table


def _albert_weights(cfg: ModelConfig) -> WeightTable:
    table = _embeddings(cfg, project="encoder.embedding_hidden_mapping_in")
    table.update({"pooler.weight": "pooler.weight", "pooler.bias": "pooler.bias"})
    inner = cfg.layer_group_size
    table.update(_layers(cfg, lambda i: f"encoder.albert_layer_groups.{i // inner}.albert_layers.{i % inner}.",
                         q="attention.query", k="attention.key", v="attention.value", attn_out="attention.dense",
                         attn_norm="attention.LayerNorm", ffn_in="ffn", ffn_out="ffn_output",
                         ffn_norm="full_layer_layer_norm"))
    return table


def _modernbert_weights(cfg: ModelConfig) -> WeightTable:
    """ModernBERT's checkpoint stores Q | K | V already fused (``attn.Wqkv``); biases and norm biases only where
    the config has them; no attention norm in layer 0."""
    table: WeightTable = {"embeddings.word.weight": "embeddings.tok_embeddings.weight",
                          "embeddings.norm.weight": "embeddings.norm.weight", "final_norm.weight": "final_norm.weight"}
    for i in range(cfg.num_layers):
        pf, hf = f"layers.{i}.", f"layers.{i}."
        linears = {"qkv": "attn.Wqkv", "attn_out": "attn.Wo", "ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo"}
        norms = {"ffn_norm": "mlp_norm"} | ({"attn_norm": "attn_norm"} if i or cfg.first_attn_norm else {})
        for name, src in linears.items():
            table[f"{pf}{name}.weight"] = f"{hf}{src}.weight"
            if cfg.attention_bias if name in ("qkv", "attn_out") else cfg.ffn_bias:
                table[f"{pf}{name}.bias"] = f"{hf}{src}.bias"
        for name, src in norms.items():
            table[f"{pf}{name}.weight"] = f"{hf}{src}.weight"
    if cfg.norm_bias:
        table.update({k[:-len("weight")] + "bias": v[:-len("weight")] + "bias" for k, v in list(table.items())
                      if "norm" in k})
    return table


# NomicBERT's two names for the same weights: transformers' modules (an in-memory model) and the hub layout that
# nomic-embed-text ships and transformers' save_pretrained writes (fused Wqkv; fc12 is the gate, fc11 the up).
_NOMIC_MODULES = dict(layer="layers.{}.", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      attn_out="self_attn.o_proj", attn_norm="post_attention_layernorm",
                      ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", ffn_norm="post_mlp_layernorm",
                      emb_norm="embeddings.LayerNorm")
_NOMIC_HUB = dict(layer="encoder.layers.{}.", qkv=("attn.Wqkv",), attn_out="attn.out_proj", attn_norm="norm1",
                  ffn_in=("mlp.fc12", "mlp.fc11"), ffn_out="mlp.fc2", ffn_norm="norm2", emb_norm="emb_ln")


def _nomic_bert_weights(names: dict) -> Callable[[ModelConfig], WeightTable]:
    """Post-LN like BERT; linears without biases (only the LayerNorms have them). SwiGLU ``act(gate x) * up x``
    is padfree's ``[input | gate]``: ``ffn_in`` = gate | up, one [2F, H] product, as Q | K | V is one."""
    def table(cfg: ModelConfig) -> WeightTable:
        out = _embeddings(cfg, norm=names["emb_norm"])
        out.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
        for i in range(cfg.num_layers):
            pf, hf = f"layers.{i}.", names["layer"].format(i)
            for name in ("qkv", "attn_out", "ffn_in", "ffn_out"):
                src = names[name]
                out[f"{pf}{name}.weight"] = tuple(f"{hf}{s}.weight" for s in src) if isinstance(src, tuple) \
                    else f"{hf}{src}.weight"
            for name in ("attn_norm", "ffn_norm"):
                out.update({f"{pf}{name}.{p}": f"{hf}{names[name]}.{p}" for p in ("weight", "bias")})
        return out
    return table


# jina-embeddings-v3's two names for the same weights: transformers' modules (an in-memory model) and the layout
# of jinaai's original checkpoint, which transformers' save_pretrained writes back (fused mixer.Wqkv, emb_ln, ...).
_JINA_MODULES = dict(layer="layers.{}.", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     attn_out="self_attn.o_proj", attn_norm="post_attention_layernorm", ffn_in="mlp.fc1",
                     ffn_out="mlp.fc2", ffn_norm="post_mlp_layernorm", emb_norm="embeddings.LayerNorm")
_JINA_HUB = dict(layer="encoder.layers.{}.", qkv=("mixer.Wqkv",), attn_out="mixer.out_proj", attn_norm="norm1",
                 ffn_in="mlp.fc1", ffn_out="mlp.fc2", ffn_norm="norm2", emb_norm="emb_ln")


def _jina_v3_weights(names: dict) -> Callable[[ModelConfig], WeightTable]:
    """Post-LN, every linear and norm with a bias; Q | K | V fused into [3H, H] (or stored fused)."""
    def table(cfg: ModelConfig) -> WeightTable:
        out = _embeddings(cfg, norm=names["emb_norm"])
        out.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias"})
        for i in range(cfg.num_layers):
            pf, hf = f"layers.{i}.", names["layer"].format(i)
            for p in ("weight", "bias"):
                out[f"{pf}qkv.{p}"] = tuple(f"{hf}{s}.{p}" for s in names["qkv"])
                for name in ("attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm"):
                    out[f"{pf}{name}.{p}"] = f"{hf}{names[name]}.{p}"
        return out
    return table


def _jina_lora_targets(cfg: ModelConfig) -> dict[str, tuple[str, tuple[tuple[str, ...], ...]]]:
    """padfree weight -> (kind, alternative module tuples carrying its adapter): transformers' module names
    (Q, K, V as three adapters) or jinaai's (one fused ``mixer.Wqkv`` adapter); see padfree.lora."""
    out = {"embeddings.word.weight": ("embedding", (("embeddings.word_embeddings",),)),
           "pooler.weight": ("linear", (("pooler.dense",),))}
    if cfg.type_vocab_size:
        out["embeddings.token_type.weight"] = ("embedding", (("embeddings.token_type_embeddings",),))
    for i in range(cfg.num_layers):
        for name in ("qkv", "attn_out", "ffn_in", "ffn_out"):
            out[f"layers.{i}.{name}.weight"] = ("linear", tuple(
                tuple(names["layer"].format(i) + m for m in (names[name] if name == "qkv" else (names[name],)))
                for names in (_JINA_MODULES, _JINA_HUB)))
    return out


def _modernbert_head(c: dict) -> HeadSpec:
    pooling = c.get("classifier_pooling", "cls")
    if pooling not in ("cls", "mean"):
        raise ValueError(f"ModernBERT classifier_pooling {pooling!r} is not supported; padfree supports 'cls', "
                         f"'mean'")
    return HeadSpec("head.dense", head_activation(c.get("classifier_activation") or "gelu"), "classifier",
                    norm="head.norm", pooling="first" if pooling == "cls" else "mean")


def _modernbert_token_head(c: dict) -> HeadSpec:
    """ModernBertForTokenClassification: the same prediction head (dense, activation, LayerNorm) on every token."""
    return HeadSpec("head.dense", head_activation(c.get("classifier_activation") or "gelu"), "classifier",
                    norm="head.norm", pooling="none")


def _eurobert_weights(cfg: ModelConfig) -> WeightTable:
    """Llama-style names: separate q/k/v (fused here into [3H, H]), gate_proj | up_proj as the gated FFN's
    [input | gate] matrix, RMSNorm weights only; biases where the config has them."""
    table: WeightTable = {"embeddings.word.weight": "embed_tokens.weight", "final_norm.weight": "norm.weight"}
    for i in range(cfg.num_layers):
        pf, hf = f"layers.{i}.", f"layers.{i}."
        table[pf + "attn_norm.weight"] = hf + "input_layernorm.weight"
        table[pf + "ffn_norm.weight"] = hf + "post_attention_layernorm.weight"
        for p in ("weight", "bias"):
            if p == "weight" or cfg.attention_bias:
                table[f"{pf}qkv.{p}"] = tuple(f"{hf}self_attn.{n}_proj.{p}" for n in "qkv")
                table[f"{pf}attn_out.{p}"] = f"{hf}self_attn.o_proj.{p}"
            if p == "weight" or cfg.ffn_bias:
                table[f"{pf}ffn_in.{p}"] = (f"{hf}mlp.gate_proj.{p}", f"{hf}mlp.up_proj.{p}")
                table[f"{pf}ffn_out.{p}"] = f"{hf}mlp.down_proj.{p}"
    return table


def _eurobert_head(c: dict) -> HeadSpec:
    pooling = c.get("classifier_pooling", "late")
    if pooling not in ("bos", "mean"):  # "late" averages per-token logits: not a pooled-vector head
        raise ValueError(f"EuroBERT classifier_pooling {pooling!r} is not supported; padfree supports 'bos', "
                         f"'mean'")
    return HeadSpec("dense", "gelu", "classifier", pooling="first" if pooling == "bos" else "mean")  # nn.GELU()


def _mpnet_weights(cfg: ModelConfig) -> WeightTable:
    table = _embeddings(cfg)
    table.update({"pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias",
                  "relative.table": "encoder.relative_attention_bias.weight"})
    table.update(_layers(cfg, lambda i: f"encoder.layer.{i}.", q="attention.attn.q", k="attention.attn.k",
                         v="attention.attn.v", attn_out="attention.attn.o", attn_norm="attention.LayerNorm",
                         ffn_in="intermediate.dense", ffn_out="output.dense", ffn_norm="output.LayerNorm"))
    return table


def _deberta_v2_weights(cfg: ModelConfig) -> WeightTable:
    table = _embeddings(cfg, project="embeddings.embed_proj")
    layer = dict(_BERT_LAYER, q="attention.self.query_proj", k="attention.self.key_proj",
                 v="attention.self.value_proj")
    table.update(_layers(cfg, lambda i: f"encoder.layer.{i}.", **layer))
    if cfg.relative_attention == "disentangled":
        table["relative.table"] = "encoder.rel_embeddings.weight"
        if cfg.norm_rel_embeddings:
            table.update({"relative.norm.weight": "encoder.LayerNorm.weight",
                          "relative.norm.bias": "encoder.LayerNorm.bias"})
        for i in range(cfg.num_layers):
            for p in ("weight", "bias"):
                if not cfg.share_att_key and "c2p" in cfg.pos_att_type:
                    table[f"layers.{i}.pos_key.{p}"] = f"encoder.layer.{i}.attention.self.pos_key_proj.{p}"
                if not cfg.share_att_key and "p2c" in cfg.pos_att_type:
                    table[f"layers.{i}.pos_query.{p}"] = f"encoder.layer.{i}.attention.self.pos_query_proj.{p}"
    return table


_POOLER = ("pooler.weight", "pooler.bias")
_BERT_MLM = MLMHeadSpec("cls.predictions.transform.dense", "hidden_act", "cls.predictions.transform.LayerNorm",
                        "cls.predictions.decoder", "cls.predictions.bias")
_TANH_HEAD = HeadSpec("classifier.dense", "tanh", "classifier.out_proj")  # RoBERTa-style head on <s>

FAMILIES: list[Family] = [
    Family("bert", ("bert",), ("bert.",), _bert_like_config("bert", lambda c: 0), _bert_weights,
           optional=_POOLER, sequence_head=lambda c: HeadSpec("bert.pooler.dense", "tanh", "classifier"),
           mlm_head=_BERT_MLM),
    # RoBERTa numbers positions from padding_idx + 1; its token-type table has one row.
    Family("roberta", ("roberta", "xlm-roberta", "camembert"), ("roberta.",),
           _bert_like_config("roberta", lambda c: c.get("pad_token_id", 1) + 1), _bert_weights,
           optional=_POOLER, sequence_head=lambda c: _TANH_HEAD,
           mlm_head=MLMHeadSpec("lm_head.dense", "=gelu", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias")),
    Family("distilbert", ("distilbert",), ("distilbert.",), _distilbert_config, _distilbert_weights,
           sequence_head=lambda c: HeadSpec("pre_classifier", "relu", "classifier"),
           mlm_head=MLMHeadSpec("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector",
                                "vocab_projector.bias")),
    Family("albert", ("albert",), ("albert.",), _albert_config, _albert_weights, optional=_POOLER,
           sequence_head=lambda c: HeadSpec("albert.pooler", "tanh", "classifier")),
    # ELECTRA's head uses (erf) GELU where BERT uses tanh, fixed in HF's code.
    Family("electra", ("electra",), ("electra.",), _bert_like_config("electra", lambda c: 0), _bert_weights,
           optional=_POOLER, sequence_head=lambda c: HeadSpec("classifier.dense", "gelu", "classifier.out_proj")),
    Family("mpnet", ("mpnet",), ("mpnet.",), _mpnet_config, _mpnet_weights, optional=_POOLER,
           sequence_head=lambda c: _TANH_HEAD),
    # DeBERTa's ContextPooler: dense + pooler_hidden_act on the first token, then the classifier.
    Family("deberta-v2", ("deberta-v2",), ("deberta.",), _deberta_v2_config, _deberta_v2_weights,
           sequence_head=lambda c: HeadSpec("pooler.dense",
                                            head_activation(c.get("pooler_hidden_act") or "gelu"),
                                            "classifier")),
    # ModernBERT: pre-LN, GeGLU, rotary positions, alternating global / sliding-window layers, all as ModelConfig
    # fields; head = pooling (cls / mean) + dense + act + LayerNorm, then the classifier
    Family("modernbert", ("modernbert",), ("model.",), _modernbert_config, _modernbert_weights, ignored=(),
           sequence_head=_modernbert_head, token_head=_modernbert_token_head),
    # EuroBERT (Llama-like): pre-norm RMSNorm, SwiGLU, rotary, no embedding norm; head = bos / mean pooling +
    # dense + GELU, then the classifier
    Family("eurobert", ("eurobert",), ("model.",), _eurobert_config, _eurobert_weights, ignored=(),
           sequence_head=_eurobert_head),
    # NomicBERT (nomic-embed-text): post-LN, rotary positions, SwiGLU, no linear biases; BERT's pooler head
    Family("nomic_bert", ("nomic_bert",), ("nomic_bert.",), _nomic_bert_config, _nomic_bert_weights(_NOMIC_HUB),
           optional=_POOLER, sequence_head=lambda c: HeadSpec("nomic_bert.pooler.dense", "tanh", "classifier"),
           other_layout=_nomic_bert_weights(_NOMIC_MODULES)),
    # jina-embeddings-v3: XLM-RoBERTa with rotary positions (post-LN, biases, GELU); task LoRA adapters merged at
    # load by padfree.lora (lora_targets: which weights carry them); RoBERTa's heads under roberta. (no
    # masked-LM mapping: its decoder is tied to the word embeddings, which an adapter changes)
    Family("jina_embeddings_v3", ("jina_embeddings_v3",), ("roberta.",), _jina_v3_config,
           _jina_v3_weights(_JINA_MODULES), optional=_POOLER, sequence_head=lambda c: _TANH_HEAD,
           other_layout=_jina_v3_weights(_JINA_HUB), lora_targets=_jina_lora_targets),
]


def family_for_config(c: dict) -> Family:
    """The family of a config.json: by ``model_type``, except jinaai's jina-embeddings-v3 config, which says
    "xlm-roberta" with rotary positions (its remote code's dialect), served by the jina_embeddings_v3 family."""
    if c.get("model_type") == "xlm-roberta" and c.get("position_embedding_type") == "rotary":
        return family_for("jina_embeddings_v3")
    return family_for(c.get("model_type", "<missing model_type>"))


def family_for(model_type: str) -> Family:
    """The family serving ``model_type``; ``ValueError`` listing the supported types otherwise."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported model_type {model_type!r}; padfree supports {supported}")
