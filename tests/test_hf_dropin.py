"""padfree as a drop-in for transformers' calls: ``position_ids``/``token_type_ids`` taken exactly as
transformers takes them, and output objects with transformers' attribute names, for every family."""
from __future__ import annotations

import pytest
import torch

import padfree

from family_zoo import CASES, LENGTHS, batch, make, max_diff

FP32_TOL = 1e-4
OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "mpnet": 2}  # first position row HF uses


def random_rows(model, mask, seed=3):
    """Arbitrary rows of the position table (not a restart-at-0 numbering) at every column, pads included."""
    g = torch.Generator().manual_seed(seed)
    lo = OFFSET.get(model.config.model_type, 0)
    return torch.randint(lo, model.config.max_position_embeddings, mask.shape, generator=g)


def hf_default_rows(model, ids, mask):
    """The positions transformers numbers by itself: from column 0 (BERT-like), or from the pad id + 1 over
    the non-pad tokens (RoBERTa, MPNet)."""
    B, S = ids.shape
    if model.config.model_type in OFFSET:
        pad = model.config.pad_token_id
        real = (ids != pad).long()
        return real.cumsum(1) * real + pad
    return torch.arange(S).expand(B, S)


@pytest.mark.parametrize("family,shape", CASES)
def test_encoder_takes_position_ids_as_transformers_does(family, shape):
    model = make(family, shape)
    enc = padfree.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        kw.pop("position_ids")
        for rows in (random_rows(model, mask), hf_default_rows(model, ids, mask)):
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask, position_ids=rows, **kw).last_hidden_state
            out = enc(ids, mask, types, position_ids=rows).last_hidden_state
            err = max_diff(out, ref, mask)
            assert err <= FP32_TOL, f"{family}[{shape}] {side}: {err:.2e}"
        if side == "left":  # transformers' own default numbering, reproduced by passing it
            with torch.no_grad():
                ref = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
            out = enc(ids, mask, types, position_ids=hf_default_rows(model, ids, mask)).last_hidden_state
            assert max_diff(out, ref, mask) <= FP32_TOL


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2"])
def test_heads_take_position_ids_and_return_logits(family):
    seq, tok = make(family, 1, "seq", num_labels=3), make(family, 1, "token", num_labels=4)
    clf, tc = padfree.SequenceClassifier.from_pretrained(seq), padfree.TokenClassifier.from_pretrained(tok)
    ids, mask, types, kw = batch(seq, LENGTHS, "right")
    kw["position_ids"] = random_rows(seq, mask)
    with torch.no_grad():
        ref_seq, ref_tok = seq(input_ids=ids, attention_mask=mask, **kw), tok(input_ids=ids, attention_mask=mask, **kw)
    out = clf(ids, mask, types, position_ids=kw["position_ids"])
    assert isinstance(out, padfree.SequenceClassifierOutput)
    assert max_diff(out.logits, ref_seq.logits) <= FP32_TOL
    out = tc(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=kw["position_ids"])
    assert isinstance(out, padfree.TokenClassifierOutput)
    assert max_diff(out.logits, ref_tok.logits, mask) <= FP32_TOL


def test_output_objects_read_like_transformers():
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    ids, mask, _, _ = batch(model, LENGTHS, "right")
    out, ref = enc(ids, mask), model(input_ids=ids, attention_mask=mask)
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key] is getattr(out, key)
        assert out[key].shape == ref[key].shape
    assert out[0] is out.last_hidden_state and out[1] is out.pooler_output and len(out.to_tuple()) == 2
    no_pooler = padfree.from_pretrained(make("distilbert", 0))(ids, mask)
    assert no_pooler.pooler_output is None and len(no_pooler.to_tuple()) == 1
    with pytest.raises(KeyError):
        no_pooler["pooler_output"]
    clf = padfree.SequenceClassifier.from_pretrained(make("bert", 0, "seq", num_labels=2))
    logits = clf(ids, mask)
    assert logits[0] is logits.logits and logits["logits"] is logits.logits


@pytest.mark.parametrize("rows,match", [
    (lambda S: torch.full((len(LENGTHS), S), 1), r"rows \[2, 42\) of the position table.*rows \[1, 1\]"),  # < offset
    (lambda S: torch.full((len(LENGTHS), S), 42), r"rows \[2, 42\).*rows \[42, 42\]"),  # past the table
    (lambda S: torch.zeros(len(LENGTHS), S + 1, dtype=torch.long), "shape"),
    (lambda S: torch.zeros(len(LENGTHS), S), "integer tensor"),  # float positions
])
def test_bad_position_ids(rows, match):
    model = make("roberta", 0)
    enc = padfree.from_pretrained(model)
    ids, mask, _, _ = batch(model, LENGTHS, "right")
    with pytest.raises(ValueError, match=match):
        enc(ids, mask, position_ids=rows(ids.shape[1]))


def test_pad_columns_of_position_ids_are_ignored():
    """Only real tokens' rows matter: any value at a pad column (HF puts the pad id there) is accepted."""
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    ids, mask, _, _ = batch(model, LENGTHS, "left")
    rows = hf_default_rows(model, ids, mask).masked_fill(mask == 0, -7)
    base = enc(ids, mask, position_ids=hf_default_rows(model, ids, mask)).last_hidden_state
    assert torch.equal(enc(ids, mask, position_ids=rows).last_hidden_state, base)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("positions", [[0, 1, 40], [0, -1, 2]])  # past the 40-row table (after the offset), negative
def test_out_of_range_positions_of_a_packed_batch_are_a_value_error(family, positions):
    """A batch built by hand (or from_padded with explicit positions) reaches the encoder without Encoder.pack's
    check: its positions are checked with the ids, not left to the embedding lookup's IndexError."""
    enc = padfree.from_pretrained(make(family, 0))
    batch = padfree.PackedBatch(torch.tensor([5, 6, 7]), torch.zeros(3, dtype=torch.long), torch.tensor(positions),
                                torch.tensor([0, 3], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"position_ids must be in \[0, 40\)"):
        enc.forward_packed(batch)
    ids = torch.tensor([[5, 6, 7]])
    packed = padfree.PackedBatch.from_padded(ids, torch.ones_like(ids), position_ids=torch.tensor([positions]))
    with pytest.raises(ValueError, match="position_ids must be in"):
        enc.forward_packed(packed)
