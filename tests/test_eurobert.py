"""EuroBERT against transformers (random weights) and the RMSNorm op against its references.

Two shapes: one with transformers' defaults (no biases, SiLU, theta 10000), one with every bias on, another RoPE
base and eps. HF numbers positions from column 0 by default, so under left padding it gets explicit per-sequence
``position_ids`` (as for the other families); rotary scores depend only on distances, so padfree's per-sequence
positions give the same result.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers as t

import padfree
from padfree.ops import rms_norm
from padfree.ops import torch_backend
from padfree.ops.reference import rms_norm_ref
from padfree.ops.registry import BACKENDS, PRIMITIVES, select

from family_zoo import (LENGTHS, batch, build, check_hidden_bf16, check_saved_directory, check_sequence_classifier,
                        hf_hidden, max_diff)

VOCAB = 60
FP32_TOL = 1e-4
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, mask_token_id=3)
LONG = LENGTHS + [100, 63]  # 1 to 100 tokens in one batch
SHAPES = [
    # transformers' defaults: no biases, SiLU, rope_theta 10000, eps 1e-5
    dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=3, intermediate_size=40,
         max_position_embeddings=128),
    # every bias on, another RoPE base and eps, four heads of 12
    dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, attention_bias=True,
         mlp_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rms_norm_eps=1e-6,
         max_position_embeddings=128),
]


def make(shape: int, kind: str = "base", seed: int = 0, attn: str = "sdpa", vocab: int = VOCAB, **extra):
    cfg = t.EuroBertConfig(vocab_size=vocab, **SPECIAL, **{**SHAPES[shape], **extra})
    cls = {"base": t.EuroBertModel, "seq": t.EuroBertForSequenceClassification,
           "tok": t.EuroBertForTokenClassification, "mlm": t.EuroBertForMaskedLM}[kind]
    return build(cls, cfg, seed, attn, norm=lambda name: "norm" in name)[0]


# ---------------------------------------------------------------------------------------------- model parity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_fp32(shape, attn):
    model = make(shape, attn=attn)
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LONG, side)
        out = enc(ids, mask).last_hidden_state
        err = max_diff(out, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"shape {shape} {attn} {side}: {err:.2e}"
        assert float(out[~mask.bool()].abs().max()) == 0.0


@pytest.mark.parametrize("shape,kv", [(0, 1), (1, 2), (1, 1)])
def test_grouped_query_attention(shape, kv):
    """num_key_value_heads < heads (EuroBERT-610m/2.1B): each K/V head repeated at load for its query heads; fp32
    parity with both paddings, and the same weights with kv = heads would compute something else."""
    model = make(shape, num_key_value_heads=kv)
    enc = padfree.from_pretrained(model)
    H = model.config.hidden_size
    assert enc.config.kv_heads == kv and enc.layers[0].qkv.weight.shape == (3 * H, H)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LONG, side)
        err = max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"shape {shape} kv {kv} {side}: {err:.2e}"
    k = model.layers[0].self_attn.k_proj.weight  # [kv d, H]
    d = H // model.config.num_attention_heads
    group = model.config.num_attention_heads // kv
    ours = enc.layers[0].qkv.weight[H:2 * H]
    assert torch.equal(ours[:group * d], k[:d].repeat(group, 1))  # query heads 0..group-1 read K head 0


def test_right_padding_needs_no_position_ids():
    """Under right padding HF's default numbering (from column 0) is padfree's: no position_ids needed."""
    model = make(0)
    ids, mask, _, _ = batch(model, LONG, "right")
    err = max_diff(padfree.from_pretrained(model)(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, {}),
                   mask)
    assert err <= FP32_TOL


@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_bf16(shape):
    check_hidden_bf16(make(shape), LONG)


@pytest.mark.parametrize("pooling", ["bos", "mean"])
@pytest.mark.parametrize("shape", [0, 1])
def test_sequence_classification(shape, pooling):
    model = make(shape, "seq", classifier_pooling=pooling, num_labels=3)
    check_sequence_classifier(model, LONG, pooling, FP32_TOL)


def test_token_classification():
    model = make(1, "tok", num_labels=5)
    clf = padfree.TokenClassifier.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LONG, side)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, **kw).logits
        err = max_diff(clf(ids, mask).logits, ref, mask)
        assert err <= FP32_TOL, f"{side}: {err:.2e}"


def test_structure_as_data():
    enc = padfree.from_pretrained(make(0))
    cfg = enc.config
    assert cfg.rms_norm and cfg.pre_norm and cfg.gated_ffn and not cfg.embedding_norm
    assert enc.embeddings.norm is None and enc.embeddings.position is None
    assert isinstance(enc.final_norm, torch.nn.RMSNorm) and all(l.attn_norm is not None for l in enc.layers)
    assert enc.layers[0].qkv.bias is None and enc.layers[0].ffn_in.weight.shape == (2 * 40, 32)  # [gate | up]
    assert enc.kernels.names["rms_norm"] == "torch"


def test_load_from_saved_directory_and_sentence_encoder(tmp_path):
    """A saved EuroBERT directory with its tokenizer: from_pretrained and SentenceEncoder (mean pooling, as
    sentence-transformers builds it) against sentence-transformers."""
    check_saved_directory(lambda vocab: make(1, vocab=vocab), tmp_path, FP32_TOL)


@pytest.mark.parametrize("pooling", ["bos", "mean"])
def test_cross_encoder_matches_sentence_transformers(pooling, tmp_path):
    import numpy as np
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from test_heads import TEXTS, save_with_tokenizer
    save_with_tokenizer(make(1, "seq", num_labels=1, classifier_pooling=pooling), tmp_path)
    pairs = [("query", p) for p in TEXTS] + [("python code", p) for p in TEXTS[:2]]
    ref = STCrossEncoder(str(tmp_path), device="cpu").predict(pairs, convert_to_numpy=True)
    assert np.abs(padfree.CrossEncoder.from_pretrained(tmp_path).score(pairs) - ref).max() <= FP32_TOL


def test_masked_lm_checkpoint_gives_its_encoder(tmp_path):
    """The hub's EuroBERT checkpoints are EuroBertForMaskedLM: the encoder under ``model.`` loads, lm_head is not
    the encoder's."""
    model = make(0, "mlm")
    model.save_pretrained(tmp_path)
    ids, mask, _, kw = batch(model, LENGTHS, "left")
    ref = hf_hidden(model.model, ids, mask, kw)
    for source in (model, tmp_path):
        assert max_diff(padfree.from_pretrained(source)(ids, mask).last_hidden_state, ref, mask) <= FP32_TOL


# ---------------------------------------------------------------------------------------------- config / loading
def _config_dir(tmp_path, **extra):
    """A directory holding only a config.json: a config error must come before any weight is read."""
    cfg = t.EuroBertConfig(vocab_size=VOCAB, **SPECIAL, **SHAPES[0]).to_dict()
    cfg.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("extra,match", [
    (dict(hidden_act="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3 must divide num_attention_heads 2"),
    (dict(head_dim=8), "head_dim 8"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(_config_dir(tmp_path, **extra))


def test_rope_theta_from_old_style_config():
    from padfree.models.families import family_for
    c = t.EuroBertConfig(vocab_size=VOCAB, **SPECIAL, **SHAPES[0]).to_dict()
    del c["rope_parameters"]
    c["rope_theta"] = 250.0
    assert family_for("eurobert").make_config(c).rotary_theta == 250.0
    assert padfree.from_pretrained(make(1)).config.rotary_theta == 500.0


def test_unused_base_weight_is_an_error():
    for kind in ("base", "seq"):
        model = make(0, kind)
        base = model if kind == "base" else model.model
        base.layers[1].planted = torch.nn.Parameter(torch.ones(3))
        key = "layers.1.planted" if kind == "base" else "model.layers.1.planted"
        with pytest.raises(ValueError, match=f"does not use.*{key}"):
            padfree.from_pretrained(model)


def test_late_pooling_is_refused(tmp_path):
    """transformers' default head averages per-token logits ("late"): not a pooled-vector head."""
    model = make(0, "seq")  # classifier_pooling defaults to "late"
    assert model.config.classifier_pooling == "late"
    with pytest.raises(ValueError, match="classifier_pooling 'late'"):
        padfree.SequenceClassifier.from_pretrained(model)


@pytest.mark.parametrize("shape", [0, 1])
def test_triton_allowed_here(shape, triton_everywhere):
    """Allowed on this device (its interpreter on a CPU), EuroBERT runs on the Triton backend whole, named or
    under "auto": RMSNorm, the rotary attention (shape 1: with a QKV bias, added before the rotation; heads of 16)
    and SwiGLU are its kernels; it matches HF and the torch backend in fp32."""
    model = make(shape, **({"num_attention_heads": 3} if shape == 1 else {}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert select("rms_norm", device, torch.float32, backend="triton", features=frozenset({"rms_norm"}))[0] == "triton"
    auto = padfree.from_pretrained(model).kernels.names  # the fused ops may be another backend's (CPU: oneDNN)
    assert {auto[op] for op in PRIMITIVES if op in auto} == {"triton"}, auto
    enc = padfree.from_pretrained(model, backend="triton")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}, enc.kernels.names
    ids, mask, _, kw = batch(model, LENGTHS, "right")
    out = enc(ids, mask).last_hidden_state
    assert max_diff(out, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL
    assert max_diff(out, padfree.from_pretrained(model, backend="torch")(ids, mask).last_hidden_state, mask) <= FP32_TOL


def test_triton_has_rms_norm_in_registry():
    triton = next(b for b in BACKENDS if b.name == "triton")
    why = triton.validate("rms_norm", torch.device("cuda"), torch.float32, features=frozenset({"rms_norm"}))
    assert [r for r in why if "not installed" not in r] == []


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_named_cpu_backends(backend):
    model = make(1)
    enc = padfree.from_pretrained(model, backend=backend)
    assert enc.kernels.names["rms_norm"] == "torch"
    ids, mask, _, kw = batch(model, LENGTHS, "left")
    assert max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL


def test_rms_norm_and_no_embedding_norm_outside_pre_norm_are_refused():
    from padfree.config import ModelConfig
    base = dict(family="x", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
                max_position_embeddings=16, type_vocab_size=0, layer_norm_eps=1e-5, activation="gelu")
    for extra in (dict(rms_norm=True, norm_bias=False), dict(embedding_norm=False)):
        with pytest.raises(ValueError, match="need pre_norm"):
            ModelConfig(**base, **extra)
    with pytest.raises(ValueError, match="norm_bias=False"):
        ModelConfig(**base, pre_norm=True, rms_norm=True)


# ---------------------------------------------------------------------------------------------- RMSNorm op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_against_references(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 48, generator=g) * 3 + 0.5).to(dtype)  # a non-zero mean: LayerNorm would differ
    w = (1 + 0.3 * torch.randn(48, generator=g)).to(dtype)
    eps = 1e-6
    x64, w64 = x.double(), w.double()
    formula = x64 * (x64.pow(2).sum(-1, keepdim=True) / x64.shape[-1] + eps) ** -0.5 * w64  # independent, fp64
    ref = rms_norm_ref(x, w, eps)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, out in (("ref", ref), ("torch", torch_backend.rms_norm(x, w, eps)), ("auto", rms_norm(x, w, eps)),
                      ("nn.RMSNorm", None)):
        if out is None:
            m = torch.nn.RMSNorm(48, eps=eps).to(torch.float64)
            with torch.no_grad():
                m.weight.copy_(w64)
                out = m(x64)
        assert out.dtype in (dtype, torch.float64)
        err = float((out.double() - formula).abs().max() / formula.abs().max())
        assert err <= tol, f"{name} {dtype}: {err:.2e}"
    layer_norm = torch.nn.functional.layer_norm(x.float(), (48,), w.float(), None, eps)
    assert max_diff(layer_norm, formula) > 0.1  # the input's mean matters: the test tells the two norms apart
