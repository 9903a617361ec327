"""NomicBERT (nomic-embed-text) against transformers' ``nomic_bert`` (random weights).

NomicBERT is BERT's post-LN layer with rotary Q/K (whole head, half-split, base ``rope_theta``), a SwiGLU FFN
and no linear biases; no position table. Two shapes with different RoPE bases and epsilons; lengths 1 to 100 in
one batch. HF gets explicit per-sequence ``position_ids`` under left padding as for the other families (rotary
scores depend only on distances, so its column numbering gives the same result too: test_families.py checks it).
"""
from __future__ import annotations

import json

import pytest

import padfree

from family_zoo import FAMILIES, batch, config_dir, hf_hidden, make_family, max_diff

FP32_TOL = 1e-4
LENGTHS = FAMILIES["nomic_bert"].lengths  # 1 to 100 tokens in one batch


def make(shape: int, kind: str = "base", **kw):
    """family_zoo's random-weight NomicBERT (its shapes: FAMILIES["nomic_bert"])."""
    return make_family("nomic_bert", shape, kind, **kw)


# ---------------------------------------------------------------------------------------------- model parity
# The parity every family shares (fp32 with both attention implementations and paddings, transformers'
# position_ids and its default numbering, bf16, the classifiers (BERT's pooler here) from memory and from a
# directory, sentence-transformers, an unused weight, the named and Triton backends) is test_families.py's
# test_rotary_*; here what only NomicBERT has.
def test_weights_are_one_product_each():
    enc = padfree.from_pretrained(make(0))
    layer = enc.layers[0]
    assert layer.qkv.weight.shape == (3 * 32, 32) and layer.ffn_in.weight.shape == (2 * 40, 32)  # [gate | up]
    assert layer.qkv.bias is None and layer.attn_out.bias is None and layer.ffn_in.bias is None
    assert layer.ffn_out.bias is None and layer.attn_norm.bias is not None and enc.final_norm is None
    assert enc.embeddings.position is None and enc.embeddings.token_type is not None


# ---------------------------------------------------------------------------------------------- loading
def test_directory_and_sentence_encoder_with_prompts(tmp_path):
    """A saved NomicBERT directory with its tokenizer and nomic-embed-text's prompts: mean pooling and the
    "search_query: " prompt as sentence-transformers applies them."""
    from sentence_transformers import SentenceTransformer
    from test_heads import tokenizer
    model = make(1)  # the tokenizer's ids are below VOCAB
    model.save_pretrained(tmp_path)  # the hub's names (emb_ln, Wqkv, fc11/fc12...), not the modules'
    assert "encoder.layers.0.mlp.fc11.weight" in padfree.loading.read_weights(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    ids, mask, types, _ = batch(model, [3, 11, 1], "right")
    enc_dir, enc_mem = padfree.from_pretrained(tmp_path), padfree.from_pretrained(model)
    assert max_diff(enc_dir(ids, mask, types).last_hidden_state, enc_mem(ids, mask, types).last_hidden_state) == 0
    SentenceTransformer(str(tmp_path), device="cpu").save(str(tmp_path))  # modules.json, 1_Pooling (mean)
    st_conf = tmp_path / "config_sentence_transformers.json"
    conf = json.loads(st_conf.read_text())
    conf["prompts"] = {"query": "search_query: ", "document": "search_document: "}
    st_conf.write_text(json.dumps(conf))
    texts = ["the cat on the mat", "a", "then the dog sat on the cat near the door of the house"]
    ours, theirs = padfree.SentenceEncoder.from_pretrained(tmp_path), SentenceTransformer(str(tmp_path), device="cpu")
    q_ours, q_theirs = ours.encode(texts, prompt_name="query"), theirs.encode(texts, prompt_name="query")
    assert abs(q_ours - q_theirs).max() <= FP32_TOL
    assert abs(q_ours - ours.encode(texts)).max() > 1e-3  # the prompt changed the embeddings


def _original_config(cfg) -> dict:
    """The config.json nomic-ai ships with nomic-embed-text (keys of its own remote code), for ``cfg``."""
    return {"model_type": "nomic_bert", "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size,
            "n_head": cfg.num_attention_heads, "n_layer": cfg.num_hidden_layers, "n_inner": cfg.intermediate_size,
            "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.layer_norm_eps,
            "rotary_emb_base": cfg.rope_parameters["rope_theta"], "rotary_emb_fraction": 1.0,
            "rotary_emb_interleaved": False, "rotary_scaling_factor": None, "activation_function": "swiglu",
            "prenorm": False, "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False,
            "type_vocab_size": cfg.type_vocab_size, "pad_token_id": cfg.pad_token_id}


def test_original_nomic_config(tmp_path):
    """The hub's nomic-embed-text directory: nomic-ai's config keys and the hub's weight names."""
    model = make(1)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_original_config(model.config)))
    enc = padfree.from_pretrained(tmp_path)
    assert enc.config.rotary_theta == 300.0 and enc.config.layer_norm_eps == 1e-6
    ids, mask, types, kw = batch(model, LENGTHS, "left")
    assert max_diff(enc(ids, mask, types).last_hidden_state, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL


@pytest.mark.parametrize("key,value", [("rotary_emb_fraction", 0.5), ("rotary_emb_interleaved", True),
                                       ("rotary_scaling_factor", 2.0), ("prenorm", True), ("qkv_proj_bias", True),
                                       ("activation_function", "gelu")])
def test_unsupported_original_option_raises_before_weights(tmp_path, key, value):
    cfg = _original_config(make(0).config)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(ValueError, match=f"NomicBERT {key}="):
        padfree.from_pretrained(tmp_path)


@pytest.mark.parametrize("extra,match", [
    (dict(hidden_act="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1000.0, "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(head_dim=8), "head_dim 8"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(config_dir("nomic_bert", tmp_path, **extra))
