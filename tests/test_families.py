"""Every family against Hugging Face transformers: hidden states at real positions, fp32 and bf16.

Two random-weight shapes per family, a batch of mixed lengths (1 and the maximum included), both padding
sides. Hugging Face numbers absolute positions from column 0 even with left padding, so the HF reference
gets explicit per-sequence ``position_ids`` (see family_zoo.batch); padfree restarts at each sequence's
first real token by construction.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import transformers as t

import padfree
from padfree.ops import RelativeScores, relative
from padfree.ops.reference import varlen_attention_ref
from padfree.ops.registry import BACKENDS, Backend, select
from padfree.ops.torch_backend import varlen_attention as varlen_attention_torch

from family_zoo import BF16_ATOL, CASES, LENGTHS, MAX_LEN, ZOO, batch, bf16_errors, make, max_diff, randomize

FP32_TOL = 1e-4


def hf_hidden(model, ids, mask, kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state


@pytest.mark.parametrize("family,shape", CASES)
def test_hidden_state_parity_fp32(family, shape):
    model = make(family, shape)
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        ref = hf_hidden(model, ids, mask, kw)
        out = enc(ids, mask, types).last_hidden_state
        err = max_diff(out, ref, mask)
        assert err <= FP32_TOL, f"{family}[{shape}] {side}: {err:.2e}"
        assert float(out[~mask.bool()].abs().max()) == 0.0  # zeros at pads


@pytest.mark.parametrize("family", list(ZOO))
def test_hidden_state_parity_bf16(family):
    model = make(family, 0)
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16)
    ids, mask, types, kw = batch(model, LENGTHS, "left")
    ours, theirs = bf16_errors(model, lambda m: enc(ids, mask, types).last_hidden_state if m is None
                               else hf_hidden(m, ids, mask, kw), mask)
    assert ours <= 2 * theirs + BF16_ATOL, f"{family} bf16: {ours:.3f} vs transformers' own bf16 {theirs:.3f}"


@pytest.mark.parametrize("family,extra", [
    # DeBERTa-v3's real bucket sizes (256 buckets, 512 positions): 300-token sequences reach the log branch
    ("deberta-v2", dict(position_buckets=256, max_position_embeddings=512, num_hidden_layers=1)),
    # MPNet beyond its max_distance of 128, where every far distance shares the last bucket
    ("mpnet", dict(max_position_embeddings=514, num_hidden_layers=1)),
])
def test_long_sequences_relative_buckets(family, extra):
    cfg_cls, base = ZOO[family][0], ZOO[family][1]
    kwargs = dict(ZOO[family][4][0], **extra)
    torch.manual_seed(0)
    model = randomize(base(cfg_cls(vocab_size=60, **kwargs)))
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, [300, 1, 270], side)
        err = max_diff(enc(ids, mask, types).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"{family} long {side}: {err:.2e}"


def test_packed_equals_padded_and_each_sequence_alone():
    """Packing several sequences gives each the same states as running it alone (relative terms included)."""
    model = make("deberta-v2", 0)
    enc = padfree.from_pretrained(model)
    seqs = [[5, 6, 7], [9] * 20, [11]]
    h = enc.forward_packed(padfree.PackedBatch.from_sequences(seqs))
    alone = torch.cat([enc.forward_packed(padfree.PackedBatch.from_sequences([s])) for s in seqs])
    assert max_diff(h, alone) <= 1e-5


def test_deberta_log_buckets_match_hf():
    """The log-bucket branch (distances beyond position_buckets / 2) equals HF's, at v3's real sizes too."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position
    d = torch.arange(-600, 601)
    for buckets, max_pos in ((8, 40), (256, 512)):
        assert torch.equal(relative.deberta_bucket(d, buckets, max_pos),
                           make_log_bucket_position(d, buckets, max_pos).long())
    shapes = ZOO["deberta-v2"][4]
    assert MAX_LEN > shapes[0]["position_buckets"]  # the parity batch reaches the log branch


def test_mpnet_buckets_match_hf():
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder
    d = torch.arange(-300, 301)
    assert torch.equal(relative.mpnet_bucket(d, 32, 128), MPNetEncoder.relative_position_bucket(-d))


@pytest.mark.parametrize("family", list(ZOO))
def test_load_from_saved_directory(family, tmp_path):
    model = make(family, 1)
    model.save_pretrained(tmp_path)
    enc_dir = padfree.from_pretrained(tmp_path)
    enc_mem = padfree.from_pretrained(model)
    ids, mask, types, _ = batch(model, [3, 11, 1], "right")
    assert max_diff(enc_dir(ids, mask, types).last_hidden_state, enc_mem(ids, mask, types).last_hidden_state) == 0


@pytest.mark.parametrize("family", ["albert", "electra", "deberta-v2"])
@pytest.mark.parametrize("same_width", [True, False])
def test_embedding_projection_parity(family, same_width):
    """E == H and E != H: ALBERT projects the embeddings whatever the widths, ELECTRA and DeBERTa only when
    they differ; padfree must do what HF does in each case."""
    H = ZOO[family][4][0]["hidden_size"]
    model = make(family, 0, embedding_size=H if same_width else H // 2)
    enc = padfree.from_pretrained(model)
    assert (enc.embeddings.project is not None) == (family == "albert" or not same_width)
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    err = max_diff(enc(ids, mask, types).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)
    assert err <= FP32_TOL, f"{family} E{'==' if same_width else '!='}H: {err:.2e}"


def _plant_weight(model, family):
    """A base-model weight no padfree table knows, as a future family's unmapped layer would be."""
    base = getattr(model, model.base_model_prefix, model)
    base.embeddings.planted = torch.nn.Parameter(torch.ones(3))
    prefix = "" if base is model else model.base_model_prefix + "."
    return prefix + "embeddings.planted"


@pytest.mark.parametrize("family", list(ZOO))
def test_unused_base_weight_is_an_error(family, tmp_path):
    """Every family, in memory and from a directory, base and task checkpoints: a base-model weight that
    padfree does not use fails loudly, naming the key; head weights outside the base prefix do not."""
    for kind in ("base", "seq"):
        model = make(family, 0, kind)
        padfree.from_pretrained(model)  # heads (outside the base prefix) are not base weights
        key = _plant_weight(model, family)
        with pytest.raises(ValueError, match=f"does not use.*{key}"):
            padfree.from_pretrained(model)
    model.save_pretrained(tmp_path)
    assert key in padfree.loading.read_weights(tmp_path)
    with pytest.raises(ValueError, match=f"does not use.*{key}"):
        padfree.from_pretrained(tmp_path)


def test_buffers_in_old_checkpoints_are_not_weights(tmp_path):
    """Checkpoints saved by older transformers hold the position_ids / token_type_ids buffers: not weights."""
    model = make("bert", 0)
    state = dict(model.state_dict())
    state["embeddings.position_ids"] = torch.arange(MAX_LEN)[None]
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model.config.save_pretrained(tmp_path)
    padfree.from_pretrained(tmp_path)


def test_family_config_is_declarative():
    albert = padfree.from_pretrained(make("albert", 1)).config
    assert albert.num_layers == 4 and albert.layer_schedule == (0, 1, 0, 1, 2, 3, 2, 3)
    assert albert.embedding_width == 24 and albert.activation == "gelu"
    deb = padfree.from_pretrained(make("deberta-v2", 0)).config
    assert (deb.relative_attention, deb.relative_buckets, deb.share_att_key, deb.norm_rel_embeddings,
            deb.absolute_positions) == ("disentangled", 8, True, True, False)
    assert math.isclose(deb.attention_scale, 1 / math.sqrt(16 * 3))
    assert padfree.from_pretrained(make("mpnet", 0)).config.relative_attention == "bias"
    assert padfree.from_pretrained(make("distilbert", 0)).config.type_vocab_size == 0


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        padfree.from_pretrained(tmp_path)


@pytest.mark.parametrize("family,key", [("bert", "hidden_act"), ("distilbert", "activation")])
def test_unsupported_activation(family, key, tmp_path):
    model = make(family, 0)
    model.config.__dict__[key] = "mish"  # a valid HF activation padfree does not implement
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unsupported activation 'mish'"):
        padfree.from_pretrained(tmp_path)


def test_unsupported_deberta_conv():
    cfg = t.DebertaV2Config(**ZOO["deberta-v2"][4][0], vocab_size=60, conv_kernel_size=3)
    with pytest.raises(ValueError, match="conv_kernel_size"):
        padfree.from_pretrained(t.DebertaV2Model(cfg))


# ---------------------------------------------------------------- the attention op's relative-score interface
def _random_rel(heads, d, max_seqlen, rows=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, rows, (2 * max_seqlen - 1,), generator=g)
    return RelativeScores(index, bias=torch.randn(heads, rows, generator=g),
                          pos_key=torch.randn(heads, rows, d, generator=g),
                          pos_query=torch.randn(heads, rows, d, generator=g))


def _pairwise_relative_attention(qkv, bias, lengths, heads, scale, rel, max_seqlen):
    """An independent oracle: every (sequence, head, i, j) score written out as RelativeScores' docstring
    defines it, one pair at a time in float64, with an explicit softmax. Shares no code with padfree."""
    T, d = qkv.shape[0], qkv.shape[1] // 3 // heads
    x = (qkv.double() + bias.double()).view(T, 3, heads, d)
    out = torch.zeros(T, heads, d, dtype=torch.float64)
    start = 0
    for n in lengths:
        for h in range(heads):
            for i in range(n):
                q = x[start + i, 0, h]
                scores = []
                for j in range(n):
                    k = x[start + j, 1, h]
                    r = int(rel.index[i - j + max_seqlen - 1])
                    s = float(q @ k)
                    if rel.pos_key is not None:
                        s += float(q @ rel.pos_key[h, r].double())
                    if rel.pos_query is not None:
                        s += float(k @ rel.pos_query[h, r].double())
                    s *= scale
                    if rel.bias is not None:
                        s += float(rel.bias[h, r])
                    scores.append(s)
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                for j in range(n):
                    out[start + i, h] += w[j] / sum(w) * x[start + j, 2, h]
        start += n
    return out.reshape(T, heads * d)


@pytest.mark.parametrize("terms", ["bias", "c2p", "p2c", "all"])
def test_varlen_attention_relative_terms(terms):
    """The reference, the torch backend and the auto-selected op against a per-pair loop, on sequences of
    several tokens (a length-1 sequence would ignore every term) with an index that is not symmetric in i - j."""
    heads, d, lengths = 2, 8, [3, 1, 7, 7, 2, 5]
    S = max(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(sum(lengths), 3 * heads * d, generator=g)
    bias = torch.randn(3 * heads * d, generator=g)
    full = _random_rel(heads, d, S)
    rel = RelativeScores(full.index, bias=full.bias if terms in ("bias", "all") else None,
                         pos_key=full.pos_key if terms in ("c2p", "all") else None,
                         pos_query=full.pos_query if terms in ("p2c", "all") else None)
    assert not torch.equal(rel.index, rel.index.flip(0))  # i - j and j - i reach different rows
    oracle = _pairwise_relative_attention(qkv, bias, lengths, heads, 0.3, rel, S)
    plain = _pairwise_relative_attention(qkv, bias, lengths, heads, 0.3, RelativeScores(full.index), S)
    assert max_diff(oracle, plain) > 0.05  # the terms change the result: the comparison below can fail
    for name, out in [("reference", varlen_attention_ref(qkv, cu, S, heads, bias, 0.3, rel)),
                      ("torch", varlen_attention_torch(qkv, cu, S, heads, bias, 0.3, rel)),
                      ("auto", padfree.ops.varlen_attention(qkv, cu, S, heads, bias, 0.3, rel=rel))]:
        assert max_diff(out, oracle) <= 1e-5, f"{name} {terms}: {max_diff(out, oracle):.2e}"
    out = varlen_attention_torch(qkv.bfloat16(), cu, S, heads, bias.bfloat16(), 0.3, rel)
    assert max_diff(out, oracle) <= 3e-2, f"torch bf16 {terms}: {max_diff(out, oracle):.2e}"


def test_registry_relative_capability(caplog):
    """A backend without relative-score support is skipped for models that need it, with the reason logged."""
    no_rel = Backend("norel", frozenset({"cpu"}), frozenset({torch.float32}), "padfree.ops.torch_backend",
                     frozenset({"varlen_attention"}))
    assert no_rel.validate("varlen_attention", torch.device("cpu"), torch.float32, 16) == []
    reasons = no_rel.validate("varlen_attention", torch.device("cpu"), torch.float32, 16, relative_scores=True)
    assert any("relative" in r for r in reasons)
    BACKENDS.insert(0, no_rel)
    try:
        with caplog.at_level(logging.INFO, logger="padfree"):
            name, _ = select("varlen_attention", "cpu", torch.float32, 16, relative_scores=True)
        assert name == "torch" and "relative" in caplog.text
        assert select("varlen_attention", "cpu", torch.float32, 16)[0] == "norel"
        with pytest.raises(ValueError, match="relative"):
            select("varlen_attention", "cpu", torch.float32, 16, backend="norel", relative_scores=True)
    finally:
        BACKENDS.remove(no_rel)
