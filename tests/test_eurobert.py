"""EuroBERT against transformers (random weights) and the RMSNorm op against its references.

Two shapes: one with transformers' defaults (no biases, SiLU, theta 10000), one with every bias on, another RoPE
base and eps. HF numbers positions from column 0 by default, so under left padding it gets explicit per-sequence
``position_ids`` (as for the other families); rotary scores depend only on distances, so padfree's per-sequence
positions give the same result.
"""
from __future__ import annotations

import pytest
import torch

import padfree
from padfree.ops import rms_norm
from padfree.ops import torch_backend
from padfree.ops.reference import rms_norm_ref
from padfree.ops.registry import BACKENDS

from family_zoo import FAMILIES, batch, config_dict, config_dir, hf_hidden, make_family, max_diff

FP32_TOL = 1e-4
LONG = FAMILIES["eurobert"].lengths  # 1 to 100 tokens in one batch


def make(shape: int, kind: str = "base", **kw):
    """family_zoo's random-weight EuroBERT (its shapes: FAMILIES["eurobert"])."""
    return make_family("eurobert", shape, kind, **kw)


# ---------------------------------------------------------------------------------------------- model parity
# The parity every family shares (fp32 with both attention implementations and paddings, HF's default position
# numbering, bf16, the classifiers, saved directories and sentence-transformers, the masked-LM checkpoint, an
# unused weight, the named and Triton backends) is test_families.py's test_rotary_*; here what only EuroBERT has.
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


def test_structure_as_data():
    enc = padfree.from_pretrained(make(0))
    cfg = enc.config
    assert cfg.rms_norm and cfg.pre_norm and cfg.gated_ffn and not cfg.embedding_norm
    assert enc.embeddings.norm is None and enc.embeddings.position is None
    assert isinstance(enc.final_norm, torch.nn.RMSNorm) and all(l.attn_norm is not None for l in enc.layers)
    assert enc.layers[0].qkv.bias is None and enc.layers[0].ffn_in.weight.shape == (2 * 40, 32)  # [gate | up]
    assert enc.kernels.names["rms_norm"] == "torch"


# ---------------------------------------------------------------------------------------------- config / loading
@pytest.mark.parametrize("extra,match", [
    (dict(hidden_act="mish"), "unsupported activation 'mish'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'linear'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(num_key_value_heads=3), "num_key_value_heads 3 must divide num_attention_heads 2"),
    (dict(head_dim=8), "head_dim 8"),
])
def test_unsupported_config_raises_before_weights(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        padfree.from_pretrained(config_dir("eurobert", tmp_path, **extra))


def test_rope_theta_from_old_style_config():
    from padfree.models.families import family_for
    c = config_dict("eurobert")
    del c["rope_parameters"]
    c["rope_theta"] = 250.0
    assert family_for("eurobert").make_config(c).rotary_theta == 250.0
    assert padfree.from_pretrained(make(1)).config.rotary_theta == 500.0


def test_late_pooling_is_refused(tmp_path):
    """transformers' default head averages per-token logits ("late"): not a pooled-vector head."""
    model = make(0, "seq")  # classifier_pooling defaults to "late"
    assert model.config.classifier_pooling == "late"
    with pytest.raises(ValueError, match="classifier_pooling 'late'"):
        padfree.SequenceClassifier.from_pretrained(model)


def test_triton_has_rms_norm_in_registry():
    triton = next(b for b in BACKENDS if b.name == "triton")
    why = triton.validate("rms_norm", torch.device("cuda"), torch.float32, features=frozenset({"rms_norm"}))
    assert [r for r in why if "not installed" not in r] == []


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
