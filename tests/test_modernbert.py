"""ModernBERT against transformers (random weights) and its new ops against their references.

Two shapes, both with global and sliding-window layers (a small ``local_attention`` so that sequences from 1
token to well beyond the window occur), with and without biases, different RoPE bases. HF gets explicit
``position_ids`` under left padding (as for the other families); rotary scores only depend on distances, so
padfree's per-sequence positions give the same result.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers as t

import padfree
from padfree.ops import apply_rotary, gated_act, rotary_tables
from padfree.ops import onednn_backend, torch_backend
from padfree.ops.reference import gated_act_ref, rotary_ref, varlen_attention_ref
from padfree.ops.registry import BACKENDS, PRIMITIVES, Backend, select

from family_zoo import (BF16_ATOL, LENGTHS, batch, build, check_hidden_bf16, check_saved_directory,
                        check_sequence_classifier, hf_hidden, max_diff)

VOCAB = 60
FP32_TOL = 1e-4
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
SHAPES = [
    # layers 0, 3 global; 1, 2 local with |i - j| <= 4; no biases anywhere (ModernBERT's defaults)
    dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=4, intermediate_size=40, local_attention=8,
         max_position_embeddings=128),
    # layers 0, 2 global; 1 local with |i - j| <= 8; every bias on, other RoPE bases, tanh GELU, eps 1e-6
    dict(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64, local_attention=16,
         global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=300.0, norm_bias=True,
         attention_bias=True, mlp_bias=True, hidden_activation="gelu_pytorch_tanh", norm_eps=1e-6,
         max_position_embeddings=128),
]


def make(shape: int, kind: str = "base", seed: int = 0, attn: str = "sdpa", vocab: int = VOCAB, **extra):
    cfg = t.ModernBertConfig(vocab_size=vocab, **SPECIAL, **{**SHAPES[shape], **extra})
    cls = {"base": t.ModernBertModel, "seq": t.ModernBertForSequenceClassification,
           "tok": t.ModernBertForTokenClassification, "mlm": t.ModernBertForMaskedLM}[kind]
    return build(cls, cfg, seed, attn, norm=lambda name: name.endswith("norm.weight"))[0]


# ---------------------------------------------------------------------------------------------- model parity
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_fp32(shape, attn):
    model = make(shape, attn=attn)
    enc = padfree.from_pretrained(model)
    assert enc.config.local_layers == ((1, 2) if shape == 0 else (1,))
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LENGTHS, side)
        out = enc(ids, mask).last_hidden_state
        err = max_diff(out, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"shape {shape} {attn} {side}: {err:.2e}"
        assert float(out[~mask.bool()].abs().max()) == 0.0


def test_long_sequences_many_window_blocks():
    """Lengths far beyond the window: the CPU attention runs several query blocks per sequence."""
    model = make(1, num_hidden_layers=2)
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, [100, 3, 70, 100], side)
        err = max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"{side}: {err:.2e}"


@pytest.mark.parametrize("shape", [0, 1])
def test_hidden_state_parity_bf16(shape):
    check_hidden_bf16(make(shape), LENGTHS)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("shape", [0, 1])
def test_sequence_classification(shape, pooling):
    model = make(shape, "seq", classifier_pooling=pooling, num_labels=3,
                 classifier_activation="gelu" if shape == 0 else "silu", classifier_bias=shape == 1)
    check_sequence_classifier(model, LENGTHS, pooling, FP32_TOL)


@pytest.mark.parametrize("shape", [0, 1])
def test_token_classification(shape):
    """ModernBertForTokenClassification: the prediction head (dense, activation, LayerNorm) then the classifier,
    on every real token; right and left padding; fp32 and bf16."""
    model = make(shape, "tok", num_labels=5, classifier_activation="gelu" if shape == 0 else "silu",
                 classifier_bias=shape == 1)
    clf = padfree.TokenClassifier.from_pretrained(model)
    clf16 = padfree.TokenClassifier.from_pretrained(model, dtype=torch.bfloat16)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LENGTHS, side)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask, **kw).logits
            theirs = copy.deepcopy(model).to(torch.bfloat16)(input_ids=ids, attention_mask=mask, **kw).logits
        ours = clf(ids, mask).logits
        assert ours.shape == ref.shape
        err = max_diff(ours, ref, mask)
        assert err <= FP32_TOL, f"{side}: {err:.2e}"
        ours16, theirs16 = max_diff(clf16(ids, mask).logits, ref, mask), max_diff(theirs, ref, mask)
        assert ours16 <= 2 * theirs16 + BF16_ATOL, f"bf16 {side}: {ours16:.3f} vs {theirs16:.3f}"


def test_layer0_has_no_attention_norm_and_norms_have_no_bias():
    enc = padfree.from_pretrained(make(0))
    assert enc.layers[0].attn_norm is None and all(l.attn_norm is not None for l in enc.layers[1:])
    assert enc.final_norm.bias is None and enc.layers[0].qkv.bias is None
    assert enc.layers[0].ffn_in.weight.shape == (2 * 40, 32)  # [input | gate]


def test_load_from_saved_directory_and_sentence_encoder(tmp_path):
    """A saved ModernBERT directory with its tokenizer: from_pretrained and SentenceEncoder (mean pooling by
    default, as sentence-transformers builds it) against sentence-transformers."""
    check_saved_directory(lambda vocab: make(1, vocab=vocab), tmp_path, FP32_TOL)


# ---------------------------------------------------------------------------------------------- config / loading
def _config_dir(tmp_path, **extra):
    """A directory holding only a config.json: a config error must come before any weight is read."""
    cfg = t.ModernBertConfig(vocab_size=VOCAB, **SPECIAL, **SHAPES[0]).to_dict()
    cfg.update(extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("extra,match", [
    (dict(hidden_activation="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]), "layer_types"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(_config_dir(tmp_path, **extra))


def test_thetas_and_layer_types_from_old_style_config():
    """Configs written before transformers 5 carry global/local_rope_theta and global_attn_every_n_layers."""
    from padfree.models.families import family_for
    c = t.ModernBertConfig(vocab_size=VOCAB, **SPECIAL, **SHAPES[0]).to_dict()
    del c["layer_types"], c["rope_parameters"]
    c.update(global_attn_every_n_layers=2, global_rope_theta=5000.0, local_rope_theta=70.0)
    cfg = family_for("modernbert").make_config(c)
    assert cfg.local_layers == (1, 3) and (cfg.rotary_theta, cfg.local_rotary_theta) == (5000.0, 70.0)


def test_unused_base_weight_is_an_error():
    for kind in ("base", "seq"):
        model = make(0, kind)
        base = model if kind == "base" else model.model
        base.embeddings.planted = torch.nn.Parameter(torch.ones(3))
        key = "embeddings.planted" if kind == "base" else "model.embeddings.planted"
        with pytest.raises(ValueError, match=f"does not use.*{key}"):
            padfree.from_pretrained(model)


def test_unsupported_pooling(tmp_path):
    make(0, "seq").save_pretrained(tmp_path)  # transformers itself refuses "max": edit the saved config
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "classifier_pooling": "max"}))
    with pytest.raises(ValueError, match="classifier_pooling 'max'"):
        padfree.SequenceClassifier.from_pretrained(tmp_path)


def test_triton_backend_has_what_modernbert_needs():
    """The Triton backend declares every op and feature ModernBERT needs (rotary and sliding window in its
    attention, a LayerNorm without bias, the gated activation); a backend without them is skipped under "auto"
    for the ops that need them (the torch ops run instead)."""
    model = make(0)
    triton = next(b for b in BACKENDS if b.name == "triton")
    cuda = torch.device("cuda")
    feats = padfree.from_pretrained(model).config.features
    assert {"rotary", "sliding_window", "gated_ffn", "norm_without_bias"} <= feats
    for op in ("varlen_attention", "embed_layer_norm", "gated_act", "add_bias_residual_layer_norm"):
        assert [r for r in triton.validate(op, cuda, torch.float32, 16, features=feats)
                if "not installed" not in r] == [], op
    plain = Backend("plain", frozenset({"cpu"}), frozenset({torch.float32}), "padfree.ops.torch_backend",
                    frozenset({"varlen_attention", "embed_layer_norm"}))
    BACKENDS.insert(0, plain)
    try:
        assert select("varlen_attention", "cpu", torch.float32, 16, features=feats)[0] == "torch"
        assert select("varlen_attention", "cpu", torch.float32, 16)[0] == "plain"  # BERT keeps it
        assert select("embed_layer_norm", "cpu", torch.float32, features=feats)[0] == \
            ("onednn" if torch.backends.mkldnn.is_available() else "torch")  # the next with the feature
    finally:
        BACKENDS.remove(plain)


# ---------------------------------------------------------------------------------------------- ops
def _packed(lengths, heads, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return torch.randn(T, 3 * heads * d, generator=g), torch.randn(3 * heads * d, generator=g), cu, pos


def test_rotary_against_reference():
    heads, d = 3, 16
    qkv, _, _, pos = _packed([1, 7, 200], heads, d)
    for theta in (10000.0, 160000.0, 50.0):
        ours = apply_rotary(qkv, *rotary_tables(pos, d, theta), heads)
        ref = rotary_ref(qkv, pos, heads, theta)
        assert max_diff(ours, ref) <= 2e-5, f"theta {theta}: {max_diff(ours, ref):.2e}"
        H = heads * d
        assert torch.equal(ours[:, 2 * H:], qkv[:, 2 * H:])  # V untouched
        assert max_diff(ours[:, :2 * H], qkv[:, :2 * H]) > 0.5  # Q and K rotated
    assert max_diff(ref, rotary_ref(qkv, pos, heads, 10000.0)) > 0.1  # the base matters
    bf = apply_rotary(qkv.bfloat16(), *rotary_tables(pos, d, 50.0), heads)
    assert max_diff(bf, ref) <= 0.05


def test_rotary_scores_depend_on_distance_only():
    """q_i . k_j after rotation is the same when both positions shift: per-sequence positions are enough."""
    heads, d = 2, 8
    qkv, _, _, pos = _packed([12], heads, d)
    a = rotary_ref(qkv, pos, heads, 100.0).view(12, 3, heads, d)
    b = rotary_ref(qkv, pos + 37, heads, 100.0).view(12, 3, heads, d)
    sa, sb = (torch.einsum("ihd,jhd->hij", x[:, 0], x[:, 1]) for x in (a, b))
    assert max_diff(sa, sb) <= 1e-4


def test_gated_act_against_reference():
    g = torch.Generator().manual_seed(0)
    x, b = torch.randn(9, 2 * 24, generator=g), torch.randn(2 * 24, generator=g)
    for act in ("gelu", "gelu_tanh", "silu"):
        ref = gated_act_ref(x, b, act)
        assert ref.shape == (9, 24)
        for name, out in (("torch", torch_backend.gated_act(x, b, act)), ("auto", gated_act(x, b, act))):
            assert max_diff(out, ref) <= 1e-6, f"{name} {act}"
    w = torch.randn(48, 16, generator=g)
    h = torch.randn(9, 16, generator=g)
    ref = gated_act_ref(h @ w.T, b, "gelu")
    assert max_diff(onednn_backend.linear_gated_act(h, w, b, "gelu"), ref) <= 1e-5
    swapped = gated_act_ref(torch.cat((x[:, 24:], x[:, :24]), 1), torch.cat((b[24:], b[:24])), "gelu")
    assert max_diff(swapped, gated_act_ref(x, b, "gelu")) > 0.1  # input and gate are not interchangeable


def _window_oracle(qkv, bias, lengths, heads, scale, window):
    """Each query attends a slice of its sequence's keys: no mask code shared with the ops."""
    T = qkv.shape[0]
    d = qkv.shape[1] // 3 // heads
    x = (qkv + bias).view(T, 3, heads, d)
    out = torch.zeros(T, heads, d)
    start = 0
    for n in lengths:
        for i in range(n):
            lo, hi = start + max(0, i - window), start + min(n, i + window + 1)
            s = torch.einsum("hd,jhd->hj", x[start + i, 0], x[lo:hi, 1]) * scale
            out[start + i] = torch.einsum("hj,jhd->hd", s.softmax(-1), x[lo:hi, 2])
        start += n
    return out.view(T, heads * d)


@pytest.mark.parametrize("window", [1, 3, 40])
def test_sliding_window_attention(window):
    heads, d, lengths = 2, 8, [70, 1, 5, 5, 33, 2, 45, 45]  # runs of equal lengths past the window too
    qkv, bias, cu, pos = _packed(lengths, heads, d)
    S = max(lengths)
    oracle = _window_oracle(qkv, bias, lengths, heads, 0.3, window)
    full = varlen_attention_ref(qkv, cu, S, heads, bias, 0.3)
    assert max_diff(oracle, full) > 0.05  # the window changes the result (each window < 70)
    for name, out in [("reference", varlen_attention_ref(qkv, cu, S, heads, bias, 0.3, window=window)),
                      ("torch", torch_backend.varlen_attention(qkv, cu, S, heads, bias, 0.3, window=window)),
                      ("auto", padfree.ops.varlen_attention(qkv, cu, S, heads, bias, 0.3, window=window))]:
        assert max_diff(out, oracle) <= 1e-5, f"{name}: {max_diff(out, oracle):.2e}"
    out = torch_backend.varlen_attention(qkv.bfloat16(), cu, S, heads, bias.bfloat16(), 0.3, window=window)
    assert max_diff(out, oracle) <= 3e-2


def test_window_scores_stay_within_the_window(monkeypatch):
    """The CPU path never scores a long sequence's full L x L: one call, in which each block of b = 32 queries
    (b = max(window, 32)) scores 3b keys, the three blocks around it."""
    heads, d, window, L = 2, 8, 4, 300
    qkv, bias, cu, pos = _packed([L], heads, d)
    shapes = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(torch_backend.F, "scaled_dot_product_attention", spy)
    torch_backend.varlen_attention(qkv, cu, L, heads, bias, 0.3, window=window)
    blocks = -(-L // 32)
    assert shapes == [((blocks, heads, 32, d), (blocks, heads, 96, d))]


def test_attention_with_rotary_and_window():
    """Rotary and the window together, as a local ModernBERT layer calls them, against the references; the
    oneDNN fused QKV path too (bias inside the product, then the same attention)."""
    heads, d, lengths, window = 2, 16, [40, 1, 9], 4
    qkv, bias, cu, pos = _packed(lengths, heads, d)
    tables = rotary_tables(pos, d, 10000.0)
    oracle = _window_oracle(rotary_ref(qkv + bias, pos, heads, 10000.0), torch.zeros_like(bias), lengths, heads,
                            0.25, window)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(qkv.shape[0], 24, generator=g), torch.randn(qkv.shape[1], 24, generator=g) * 0.3
    fused_oracle = varlen_attention_ref(x @ w.T, cu, 40, heads, bias, 0.25, rotary=tables, window=window)
    for name, out, ref in [
            ("reference", varlen_attention_ref(qkv, cu, 40, heads, bias, 0.25, rotary=tables, window=window), oracle),
            ("torch", torch_backend.varlen_attention(qkv, cu, 40, heads, bias, 0.25, rotary=tables, window=window),
             oracle),
            ("auto", padfree.ops.varlen_attention(qkv, cu, 40, heads, bias, 0.25, rotary=tables, window=window),
             oracle),
            ("onednn", onednn_backend.qkv_varlen_attention(x, w, bias, cu, 40, heads, 0.25, rotary=tables,
                                                           window=window), fused_oracle)]:
        assert max_diff(out, ref) <= 2e-5, f"{name}: {max_diff(out, ref):.2e}"


@pytest.mark.parametrize("shape", [0, 1])
def test_triton_allowed_here(shape, triton_everywhere):
    """With the Triton backend allowed on this device (its interpreter on a CPU), ModernBERT runs on it whole,
    named or under "auto": rotary and the sliding window (local layers, sequences longer than the window) in the
    attention kernel, the bias-free embedding LayerNorm, GeGLU; it matches HF in fp32. Shape 1 (every bias on:
    the QKV bias is added before the rotation) with heads of 16, a size the kernel has."""
    model = make(shape, **({"num_attention_heads": 3} if shape == 1 else {}))
    auto = padfree.from_pretrained(model).kernels.names  # the fused ops may be another backend's (CPU: oneDNN)
    assert {auto[op] for op in PRIMITIVES if op in auto} == {"triton"}, auto
    enc = padfree.from_pretrained(model, backend="triton")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}, enc.kernels.names
    assert enc.config.window(1) < max(LENGTHS) - 1  # a local layer's band is narrower than the longest sequence
    ids, mask, _, kw = batch(model, LENGTHS, "right")
    assert max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL
    torch_enc = padfree.from_pretrained(model, backend="torch")
    assert max_diff(enc(ids, mask).last_hidden_state, torch_enc(ids, mask).last_hidden_state, mask) <= FP32_TOL


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_named_cpu_backends(backend):
    """The torch backend alone (gated FFN composed from F.linear + gated_act) and oneDNN's fused ops."""
    model = make(1)
    enc = padfree.from_pretrained(model, backend=backend)
    assert enc.kernels.names["linear_gated_act"] == ("composed(torch)" if backend == "torch" else "onednn")
    ids, mask, _, kw = batch(model, LENGTHS, "left")
    assert max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL


def test_features_outside_pre_norm_are_refused():
    from padfree.config import ModelConfig
    base = dict(family="x", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, intermediate_size=8,
                max_position_embeddings=16, type_vocab_size=0, layer_norm_eps=1e-5, activation="gelu")
    for extra in (dict(local_layers=(1,), local_window=2), dict(first_attn_norm=False)):
        with pytest.raises(ValueError, match="need pre_norm"):
            ModelConfig(**base, **extra)
    ModelConfig(**base, gated_ffn=True, rotary_theta=10.0)  # post-LN reads both (NomicBERT)
    with pytest.raises(ValueError, match="relative_attention"):
        ModelConfig(**base, rotary_theta=10.0, relative_attention="bias", relative_buckets=32)
    with pytest.raises(ValueError, match="local_window"):
        ModelConfig(**base, pre_norm=True, local_layers=(1,))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_cross_encoder_matches_sentence_transformers(pooling, tmp_path):
    import numpy as np
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from test_heads import TEXTS, save_with_tokenizer
    save_with_tokenizer(make(1, "seq", num_labels=1, classifier_pooling=pooling), tmp_path)
    pairs = [("query", p) for p in TEXTS] + [("python code", p) for p in TEXTS[:2]]
    ref = STCrossEncoder(str(tmp_path), device="cpu").predict(pairs, convert_to_numpy=True)
    assert np.abs(padfree.CrossEncoder.from_pretrained(tmp_path).score(pairs) - ref).max() <= FP32_TOL


def test_layer_norms_without_bias_against_reference():
    """ModernBERT's bias-less LayerNorms through the ops that take a LayerNorm bias (None), vs the references."""
    from padfree.ops.reference import add_bias_residual_layer_norm_ref, embed_layer_norm_ref
    g = torch.Generator().manual_seed(0)
    word, w = torch.randn(20, 16, generator=g), 1 + 0.2 * torch.randn(16, generator=g)
    ids = torch.tensor([3, 0, 19, 7])
    ref = embed_layer_norm_ref(ids, None, None, word, None, None, w, None, 1e-5)
    assert max_diff(padfree.ops.embed_layer_norm(ids, None, None, word, None, None, w, None, 1e-5), ref) <= 1e-6
    assert max_diff(ref, embed_layer_norm_ref(ids, None, None, word, None, None, w, torch.ones(16), 1e-5)) > 0.5
    x, r = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    ref = add_bias_residual_layer_norm_ref(x, None, r, w, None, 1e-5)
    assert max_diff(padfree.ops.add_bias_residual_layer_norm(x, None, r, w, None, 1e-5), ref) <= 1e-6


def test_masked_lm_checkpoint_gives_its_encoder(tmp_path):
    """Hub ModernBERT checkpoints are *ForMaskedLM: the encoder under ``model.``, the MLM head and decoder outside."""
    model = make(0, "mlm")
    model.save_pretrained(tmp_path)
    ids, mask, _, kw = batch(model, LENGTHS, "right")
    ref = hf_hidden(model.model, ids, mask, kw)
    for source in (model, tmp_path):
        assert max_diff(padfree.from_pretrained(source)(ids, mask).last_hidden_state, ref, mask) <= FP32_TOL


def test_bucketed_forward_on_triton(triton_everywhere):
    """The CUDA-graph runner's static layout (sequence slots of length 0, token slots in no sequence, max_seqlen =
    the bucket) through the Triton kernels with rotary and a window narrower than the bucket: every real token
    gets the eager result (in the interpreter on a CPU, captured on a GPU)."""
    from padfree.cuda_graphs import CudaGraphEncoder
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    enc = padfree.from_pretrained(make(0), device=device, backend="triton")
    runner = CudaGraphEncoder(enc, buckets=(48,), max_batch=6, capture=gpu)
    for lengths in ([3, 17, 1], [40], [9, 9, 20]):
        batch = padfree.PackedBatch.from_sequences([list(range(3, 3 + n)) for n in lengths], device=device)
        torch.testing.assert_close(runner.forward_packed(batch), enc.forward_packed(batch), atol=1e-5, rtol=1e-5)
