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
from padfree.ops.registry import BACKENDS, PRIMITIVES, Backend, select
from padfree.ops.torch_backend import varlen_attention as varlen_attention_torch

from family_zoo import (CASES, FAMILIES, LENGTHS, MAX_LEN, ROTARY, ROTARY_CASES, ZOO, batch, check_cross_encoder,
                        check_hidden_bf16, check_hidden_fp32, check_saved_directory, check_sequence_classifier,
                        check_token_classifier, hf_hidden, make, make_family, max_diff, randomize)

FP32_TOL = 1e-4


@pytest.mark.parametrize("family,shape", CASES)
def test_hidden_state_parity_fp32(family, shape):
    check_hidden_fp32(make(family, shape), LENGTHS, FP32_TOL)


@pytest.mark.parametrize("family", list(ZOO))
def test_hidden_state_parity_bf16(family):
    check_hidden_bf16(make(family, 0), LENGTHS)


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
    module = FAMILIES[family].plant if family in FAMILIES else "embeddings"
    base.get_submodule(module).planted = torch.nn.Parameter(torch.ones(3))
    prefix = "" if base is model else model.base_model_prefix + "."
    return f"{prefix}{module}.planted"


@pytest.mark.parametrize("family", list(ZOO) + ROTARY)
def test_unused_base_weight_is_an_error(family, tmp_path):
    """Every family, in memory and from a directory, base and task checkpoints: a base-model weight that
    padfree does not use fails loudly, naming the key; head weights outside the base prefix do not."""
    for kind in ("base", "seq"):
        model = make_family(family, 0, kind) if family in FAMILIES else make(family, 0, kind)
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


# ---------------------------------------------------------------- families outside ZOO's mould (family_zoo.FAMILIES)
# EuroBERT, ModernBERT, NomicBERT: rotary positions, gated FFNs, their own norms and special tokens. The same
# checks as the zoo's, on each family's own batch (1 token to its longest); what only one family has (ModernBERT's
# local windows, EuroBERT's grouped K/V and RMSNorm, config dialects) is in its own test file. jina-v3 runs these
# checks per task adapter in test_jina_v3.py.
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,shape", ROTARY_CASES)
def test_rotary_hidden_state_parity_fp32(family, shape, attn):
    """Both padding sides; transformers' position_ids read as they are, and its default numbering from column 0
    (no position_ids) gives the same states: rotary scores depend on distances only."""
    model = make_family(family, shape, attn=attn)
    enc = padfree.from_pretrained(model)
    for key, value in FAMILIES[family].expect[shape].items():
        assert getattr(enc.config, key) == value, key
    check_hidden_fp32(model, FAMILIES[family].lengths, FP32_TOL, enc, rotary=True)


@pytest.mark.parametrize("family,shape", ROTARY_CASES)
def test_rotary_hidden_state_parity_bf16(family, shape):
    check_hidden_bf16(make_family(family, shape), FAMILIES[family].lengths)


@pytest.mark.parametrize("family,shape,pooling", [(f, s, p) for f, s in ROTARY_CASES for p in FAMILIES[f].poolings])
def test_rotary_sequence_classification(family, shape, pooling, tmp_path):
    """The family's head (EuroBERT and ModernBERT: each classifier_pooling; NomicBERT: BERT's tanh pooler), from
    memory and from a saved directory (the hub's names)."""
    extra = {} if pooling is None else {"classifier_pooling": pooling}
    model = make_family(family, shape, "seq", num_labels=3, **FAMILIES[family].head[shape], **extra)
    check_sequence_classifier(model, FAMILIES[family].lengths, pooling, FP32_TOL, tmp_path)


@pytest.mark.parametrize("family,shape", ROTARY_CASES)
def test_rotary_token_classification(family, shape):
    """ModernBERT's prediction head (dense, activation, LayerNorm) before the classifier; the others' classifier
    alone."""
    model = make_family(family, shape, "token", num_labels=5, **FAMILIES[family].head[shape])
    check_token_classifier(model, FAMILIES[family].lengths, FP32_TOL)


@pytest.mark.parametrize("family", ROTARY)
def test_rotary_saved_directory_and_sentence_encoder(family, tmp_path):
    """A saved directory with its tokenizer: from_pretrained and SentenceEncoder (mean pooling, as
    sentence-transformers builds it) against sentence-transformers."""
    check_saved_directory(lambda vocab: make_family(family, 1, vocab=vocab), tmp_path, FP32_TOL)


@pytest.mark.parametrize("family,pooling", [(f, p) for f in ROTARY for p in FAMILIES[f].poolings])
def test_rotary_cross_encoder_matches_sentence_transformers(family, pooling, tmp_path):
    extra = {} if pooling is None else {"classifier_pooling": pooling}
    check_cross_encoder(make_family(family, 1, "seq", num_labels=1, **extra), tmp_path, FP32_TOL)


@pytest.mark.parametrize("family", [f for f in ROTARY if "mlm" in FAMILIES[f].classes])
def test_rotary_masked_lm_checkpoint_gives_its_encoder(family, tmp_path):
    """The hub's checkpoints are *ForMaskedLM: the encoder under ``model.`` loads (in memory and from a
    directory), the MLM head is not the encoder's."""
    model = make_family(family, 0, "mlm")
    model.save_pretrained(tmp_path)
    encoders = [padfree.from_pretrained(source) for source in (model, tmp_path)]
    for side in ("right", "left"):
        ids, mask, _, kw = batch(model, LENGTHS, side)
        ref = hf_hidden(model.model, ids, mask, kw)
        for enc in encoders:
            assert max_diff(enc(ids, mask).last_hidden_state, ref, mask) <= FP32_TOL, side


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("family", ROTARY)
def test_rotary_named_cpu_backends(family, backend):
    """The torch backend alone (the gated FFN composed from F.linear and gated_act) and oneDNN's fused ops; RMSNorm
    is the torch backend's under both."""
    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN")
    model = make_family(family, 1)
    enc = padfree.from_pretrained(model, backend=backend)
    names = enc.kernels.names
    assert names["linear_gated_act"] == ("composed(torch)" if backend == "torch" else "onednn"), names
    if enc.config.rms_norm:
        assert names["rms_norm"] == "torch", names
    check_hidden_fp32(model, FAMILIES[family].lengths, FP32_TOL, enc)


@pytest.mark.parametrize("family,shape", [("eurobert", 0), ("eurobert", 1), ("modernbert", 0), ("modernbert", 1),
                                          ("nomic_bert", 0)])
def test_rotary_whole_on_triton(family, shape, triton_everywhere):
    """With the Triton backend allowed on this device (its interpreter on a CPU), the family runs on it whole,
    named or under "auto": rotary in the attention kernel (shape 1: with a QKV bias, added before the rotation;
    heads of 16, a size the kernel has), ModernBERT's sliding window (sequences longer than the window), the
    bias-free LayerNorm or RMSNorm, the gated FFN; it matches HF and the torch backend in fp32."""
    model = make_family(family, shape, **({"num_attention_heads": 3} if shape == 1 else {}))
    auto = padfree.from_pretrained(model).kernels.names  # the fused ops may be another backend's (CPU: oneDNN)
    assert {auto[op] for op in PRIMITIVES if op in auto} == {"triton"}, auto
    enc = padfree.from_pretrained(model, backend="triton")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}, enc.kernels.names
    if enc.config.rms_norm:
        assert enc.kernels.names["rms_norm"] == "triton"
    if enc.config.local_layers:  # a local layer's band is narrower than the longest sequence
        assert enc.config.window(enc.config.local_layers[0]) < max(LENGTHS) - 1
    # one side each: the interpreter is slow (NomicBERT: its token types, and a shorter batch)
    side, lengths = ("left", [5, 40, 1, 17]) if family == "nomic_bert" else ("right", LENGTHS)
    ids, mask, types, kw = batch(model, lengths, side)
    out = enc(ids, mask, types).last_hidden_state
    assert max_diff(out, hf_hidden(model, ids, mask, kw), mask) <= FP32_TOL
    torch_out = padfree.from_pretrained(model, backend="torch")(ids, mask, types).last_hidden_state
    assert max_diff(out, torch_out, mask) <= FP32_TOL


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
