"""NomicBERT (nomic-embed-text) against transformers' ``nomic_bert`` (random weights).

NomicBERT is BERT's post-LN layer with rotary Q/K (whole head, half-split, base ``rope_theta``), a SwiGLU FFN
and no linear biases; no position table. Two shapes with different RoPE bases and epsilons; lengths 1 to 100 in
one batch. HF gets explicit per-sequence ``position_ids`` under left padding as for the other families (rotary
scores depend only on distances, so its column numbering gives the same result too, checked once).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers as t

import padfree
from padfree.ops.registry import PRIMITIVES

from family_zoo import batch, build, check_hidden_bf16, hf_hidden, max_diff

VOCAB = 60
FP32_TOL = 1e-4
LENGTHS = [5, 100, 1, 37, 2, 64, 17]
SHAPES = [
    dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=40,
         max_position_embeddings=128),
    dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, layer_norm_eps=1e-6,
         rope_parameters={"rope_type": "default", "rope_theta": 300.0}, max_position_embeddings=256),
]


def make(shape: int, kind: str = "base", seed: int = 0, vocab: int = VOCAB, attn: str = "sdpa", **extra):
    cfg = t.NomicBertConfig(vocab_size=vocab, pad_token_id=1, **{**SHAPES[shape], **extra})
    cls = {"base": t.NomicBertModel, "seq": t.NomicBertForSequenceClassification,
           "token": t.NomicBertForTokenClassification}[kind]
    return build(cls, cfg, seed, attn)[0]


# ---------------------------------------------------------------------------------------------- model parity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_fp32(shape, attn):
    model = make(shape, attn=attn)
    enc = padfree.from_pretrained(model)
    assert enc.config.rotary_theta == (1000.0 if shape == 0 else 300.0) and not enc.config.pre_norm
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        assert types is not None  # token types are read (type_vocab_size 2)
        ref = hf_hidden(model, ids, mask, kw)
        out = enc(ids, mask, types).last_hidden_state
        err = max_diff(out, ref, mask)
        assert err <= FP32_TOL, f"shape {shape} {attn} {side}: {err:.2e}"
        assert float(out[~mask.bool()].abs().max()) == 0.0
        # transformers' position_ids are accepted as they are (rotary: no offset)
        assert max_diff(enc(ids, mask, types, kw["position_ids"]).last_hidden_state, ref, mask) <= FP32_TOL
    # HF's own numbering from column 0 under left padding: same scores, rotary depends on distances only
    ref = hf_hidden(model, ids, mask, {"token_type_ids": types})
    assert max_diff(enc(ids, mask, types).last_hidden_state, ref, mask) <= FP32_TOL


@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_bf16(shape):
    check_hidden_bf16(make(shape), LENGTHS)


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_named_cpu_backends(backend):
    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    model = make(1)
    enc = padfree.from_pretrained(model, backend=backend)
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    assert max_diff(enc(ids, mask, types).last_hidden_state, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL


def test_sequence_classification(tmp_path):
    """BERT's head: tanh pooler on the first token, then the classifier."""
    model = make(1, "seq", num_labels=3)
    clf = padfree.SequenceClassifier.from_pretrained(model)
    ids, mask, types, kw = batch(model, LENGTHS, "right")  # HF's pooler reads column 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **kw).logits
    assert max_diff(clf(ids, mask, types).logits, ref) <= FP32_TOL
    ids_l, mask_l, types_l, _ = batch(model, LENGTHS, "left")  # padfree's first token is the first real one
    assert max_diff(clf(ids_l, mask_l, types_l).logits, ref) <= FP32_TOL
    model.save_pretrained(tmp_path)  # the hub's names under nomic_bert.
    assert max_diff(padfree.SequenceClassifier.from_pretrained(tmp_path)(ids, mask, types).logits, ref) <= FP32_TOL


def test_token_classification():
    model = make(0, "token", num_labels=5)
    tc = padfree.TokenClassifier.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, **kw).logits
        assert max_diff(tc(ids, mask, types).logits, ref, mask) <= FP32_TOL, side


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


def test_cross_encoder_matches_sentence_transformers(tmp_path):
    import numpy as np
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from test_heads import TEXTS, save_with_tokenizer
    save_with_tokenizer(make(0, "seq", num_labels=1), tmp_path)
    pairs = [("query", p) for p in TEXTS] + [("python code", p) for p in TEXTS[:2]]
    ref = STCrossEncoder(str(tmp_path), device="cpu").predict(pairs, convert_to_numpy=True)
    assert np.abs(padfree.CrossEncoder.from_pretrained(tmp_path).score(pairs) - ref).max() <= FP32_TOL


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


def _config_dir(tmp_path, **extra):
    """A directory holding only a config.json: a config error must come before any weight is read."""
    cfg = t.NomicBertConfig(vocab_size=VOCAB, **SHAPES[0]).to_dict()
    cfg.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


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
        padfree.from_pretrained(_config_dir(tmp_path, **extra))


def test_unused_base_weight_is_an_error():
    for kind in ("base", "seq"):
        model = make(0, kind)
        base = model if kind == "base" else model.nomic_bert
        base.embeddings.planted = torch.nn.Parameter(torch.ones(3))
        key = "embeddings.planted" if kind == "base" else "nomic_bert.embeddings.planted"
        with pytest.raises(ValueError, match=f"does not use.*{key}"):
            padfree.from_pretrained(model)


def test_triton_allowed_here(triton_everywhere):
    """With the Triton backend allowed on this device (its interpreter on a CPU), NomicBERT runs on it whole,
    named or under "auto" (rotary in the attention kernel, SwiGLU, post-LN LayerNorms) and matches HF and the
    torch backend in fp32."""
    model = make(0)
    auto = padfree.from_pretrained(model).kernels.names  # the fused ops may be another backend's (CPU: oneDNN)
    assert {auto[op] for op in PRIMITIVES if op in auto} == {"triton"}, auto
    enc = padfree.from_pretrained(model, backend="triton")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}, enc.kernels.names
    ids, mask, types, kw = batch(model, [5, 40, 1, 17], "left")
    out = enc(ids, mask, types).last_hidden_state
    assert max_diff(out, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL
    torch_enc = padfree.from_pretrained(model, backend="torch")
    assert max_diff(out, torch_enc(ids, mask, types).last_hidden_state, mask) <= FP32_TOL
