"""ModernBERT against transformers (random weights) and its new ops against their references.

Two shapes, both with global and sliding-window layers (a small ``local_attention`` so that sequences from 1
token to well beyond the window occur), with and without biases, different RoPE bases. HF gets explicit
``position_ids`` under left padding (as for the other families); rotary scores only depend on distances, so
padfree's per-sequence positions give the same result.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import padfree
from padfree.ops import apply_rotary, gated_act, rotary_tables
from padfree.ops import onednn_backend, torch_backend
from padfree.ops.reference import gated_act_ref, rotary_ref, varlen_attention_ref
from padfree.ops.registry import BACKENDS, Backend, select

from family_zoo import batch, config_dict, config_dir, hf_hidden, make_family, max_diff

FP32_TOL = 1e-4


def make(shape: int, kind: str = "base", **kw):
    """family_zoo's random-weight ModernBERT (its shapes: FAMILIES["modernbert"]; both with global and local
    layers)."""
    return make_family("modernbert", shape, kind, **kw)


# ---------------------------------------------------------------------------------------------- model parity
# The parity every family shares (fp32 with both attention implementations and paddings, HF's default position
# numbering, bf16, the classifiers, saved directories and sentence-transformers, the masked-LM checkpoint, an
# unused weight, the named and Triton backends) is test_families.py's test_rotary_*; here what only ModernBERT has.
def test_long_sequences_many_window_blocks():
    """Lengths far beyond the window: the CPU attention runs several query blocks per sequence."""
    model = make(1, num_hidden_layers=2)
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, [100, 3, 70, 100], side)
        err = max_diff(enc(ids, mask).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"{side}: {err:.2e}"


def test_layer0_has_no_attention_norm_and_norms_have_no_bias():
    enc = padfree.from_pretrained(make(0))
    assert enc.layers[0].attn_norm is None and all(l.attn_norm is not None for l in enc.layers[1:])
    assert enc.final_norm.bias is None and enc.layers[0].qkv.bias is None
    assert enc.layers[0].ffn_in.weight.shape == (2 * 40, 32)  # [input | gate]


# ---------------------------------------------------------------------------------------------- config / loading
@pytest.mark.parametrize("extra,match", [
    (dict(hidden_activation="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]), "layer_types"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(config_dir("modernbert", tmp_path, **extra))


def test_thetas_and_layer_types_from_old_style_config():
    """Configs written before transformers 5 carry global/local_rope_theta and global_attn_every_n_layers."""
    from padfree.models.families import family_for
    c = config_dict("modernbert")
    del c["layer_types"], c["rope_parameters"]
    c.update(global_attn_every_n_layers=2, global_rope_theta=5000.0, local_rope_theta=70.0)
    cfg = family_for("modernbert").make_config(c)
    assert cfg.local_layers == (1, 3) and (cfg.rotary_theta, cfg.local_rotary_theta) == (5000.0, 70.0)


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
