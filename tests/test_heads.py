"""Task heads against Hugging Face: sequence classification and token classification for every family
(two shapes, both padding sides), labels API, cross-encoder reranking vs sentence-transformers, and
sentence embeddings for every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as t

import padfree

from family_zoo import BF16_ATOL, CASES, LENGTHS, ZOO, batch, bf16_errors, make, max_diff

FP32_TOL = 1e-4

WORDS = "the a cat dog sat on mat query passage python code fast slow runs ran is was big small red blue".split()
TEXTS = ["the cat sat on the mat", "dog", "python code runs fast is big and red",  # "and" is unknown
         "a small blue dog ran on a big red mat the cat was slow the python code is fast", "query"]


def tokenizer():
    # id 1 is [PAD]: RoBERTa/MPNet number positions from pad id 1, so no real token (not even [UNK]) may be 1
    vocab = {w: i for i, w in enumerate(["[MASK]", "[PAD]", "[CLS]", "[SEP]", "[UNK]"] + WORDS)}
    return t.BertTokenizer(vocab=vocab, model_max_length=512)


def save_with_tokenizer(model, path):
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def hf_logits(model, ids, mask, kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("family,shape", CASES)
def test_sequence_classification_parity(family, shape):
    model = make(family, shape, "seq", num_labels=3)
    clf = padfree.SequenceClassifier.from_pretrained(model)
    # HF's heads read column 0, a pad under left padding: its reference is the right-padded batch (same
    # tokens); padfree reads each sequence's first real token whatever the padding side.
    ref = hf_logits(model, *batch(model, LENGTHS, "right")[:2], batch(model, LENGTHS, "right")[3])
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        err = max_diff(clf(ids, mask, types).logits, ref)
        assert err <= FP32_TOL, f"{family}[{shape}] {side}: {err:.2e}"


@pytest.mark.parametrize("family,shape", CASES)
def test_token_classification_parity(family, shape):
    model = make(family, shape, "token", num_labels=5)
    tc = padfree.TokenClassifier.from_pretrained(model)
    for side in ("right", "left"):
        ids, mask, types, kw = batch(model, LENGTHS, side)
        out = tc(ids, mask, types).logits  # [B, S, 5], zeros at pads
        err = max_diff(out, hf_logits(model, ids, mask, kw), mask)
        assert err <= FP32_TOL, f"{family}[{shape}] {side}: {err:.2e}"
        packed = tc.logits_packed(padfree.PackedBatch.from_padded(ids, mask, types))
        assert packed.shape == (int(mask.sum()), 5)


@pytest.mark.parametrize("family", list(ZOO))
def test_sequence_classification_bf16(family):
    model = make(family, 0, "seq", num_labels=3)
    clf = padfree.SequenceClassifier.from_pretrained(model, dtype=torch.bfloat16)
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    ours, theirs = bf16_errors(model, lambda m: clf(ids, mask, types).logits if m is None
                               else hf_logits(m, ids, mask, kw))
    assert ours <= 2 * theirs + BF16_ATOL, f"{family} bf16: {ours:.3f} vs transformers' own bf16 {theirs:.3f}"


def test_labels_single_multi_regression():
    id2label = {0: "neg", 1: "neu", 2: "pos"}
    model = make("electra", 0, "seq", num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    clf = padfree.SequenceClassifier.from_pretrained(model)
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    logits = clf(ids, mask, types).logits
    assert clf.problem_type == "single_label_classification"
    assert clf.labels(logits) == [id2label[i] for i in hf_logits(model, ids, mask, kw).argmax(-1).tolist()]
    assert torch.allclose(clf.probabilities(logits).sum(-1), torch.ones(len(LENGTHS)))

    multi = make("deberta-v2", 0, "seq", num_labels=3, problem_type="multi_label_classification", id2label=id2label,
                 label2id={v: k for k, v in id2label.items()})
    mclf = padfree.SequenceClassifier.from_pretrained(multi)
    ml = mclf(ids, mask).logits
    expect = [[id2label[i] for i in range(3) if p[i] > 0.5] for p in torch.sigmoid(hf_logits(multi, ids, mask, {})).tolist()]
    assert mclf.problem_type == "multi_label_classification" and mclf.labels(ml) == expect

    reg = make("distilbert", 1, "seq", num_labels=1)
    rclf = padfree.SequenceClassifier.from_pretrained(reg)
    values = rclf.labels(rclf(ids, mask).logits)
    assert rclf.problem_type == "regression" and all(isinstance(v, float) for v in values)
    assert np.allclose(values, hf_logits(reg, ids, mask, batch(reg, LENGTHS, "right")[3])[:, 0].tolist(), atol=1e-4)


def test_sequence_classifier_predict_texts(tmp_path):
    model = make("bert", 0, "seq", num_labels=2)
    clf = padfree.SequenceClassifier.from_pretrained(save_with_tokenizer(model, tmp_path))
    tok = tokenizer()
    enc = tok(TEXTS[:3], TEXTS[1:4], padding=True, return_tensors="pt")
    expect = [model.config.id2label[i] for i in model(**enc).logits.argmax(-1).tolist()]
    assert clf.predict(TEXTS[:3], TEXTS[1:4]) == expect
    calls = count_batches(clf)
    assert clf.predict(TEXTS[:3], TEXTS[1:4], batch_tokens=8) == expect and len(calls) == 3  # one pair per batch
    assert clf.predict(iter(TEXTS[:3]), TEXTS[1:4], batch_tokens=30) == expect and calls[3:] == [2, 1]


def count_batches(head):
    """Record the number of sequences of each batch the head's encoder runs."""
    calls, inner = [], head.encoder.forward_packed

    def counted(batch, *args, **kwargs):
        calls.append(batch.batch_size)
        return inner(batch, *args, **kwargs)
    head.encoder.forward_packed = counted
    return calls


def test_token_classifier_words(tmp_path):
    model = make("roberta", 0, "token", num_labels=4)
    tc = padfree.TokenClassifier.from_pretrained(save_with_tokenizer(model, tmp_path))
    words = tc.predict(TEXTS[:2])
    assert [w["word"] for w in words[0]] == TEXTS[0].split() and [w["word"] for w in words[1]] == ["dog"]
    calls = count_batches(tc)
    assert tc.predict(TEXTS, batch_tokens=10)[:2] == words and len(calls) == len(TEXTS)  # by the token budget
    with pytest.raises(ValueError, match="text 1 is not a string: NoneType"):
        tc.predict(["dog", None])
    enc = tokenizer()(TEXTS[0], return_tensors="pt")
    ref = model(input_ids=enc["input_ids"]).logits[0].argmax(-1)  # one sequence, no padding
    assert [w["label"] for w in words[0]] == [model.config.id2label[int(ref[w["token"]])] for w in words[0]]


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_cross_encoder_matches_sentence_transformers(family, tmp_path):
    from sentence_transformers import CrossEncoder as STCrossEncoder
    model = make(family, 0, "seq", num_labels=1)
    save_with_tokenizer(model, tmp_path)
    ours = padfree.CrossEncoder.from_pretrained(tmp_path)
    theirs = STCrossEncoder(str(tmp_path), device="cpu")
    pairs = [("query", p) for p in TEXTS] + [("python code", p) for p in TEXTS[:2]]
    ref = theirs.predict(pairs, convert_to_numpy=True)
    assert np.abs(ours.score(pairs) - ref).max() <= FP32_TOL
    assert np.abs(ours.score(pairs, batch_tokens=16) - ref).max() <= FP32_TOL  # several token-budget batches
    ranked = ours.rank("query", TEXTS)
    assert [r["corpus_id"] for r in ranked] == list(np.argsort(-ref[:len(TEXTS)], kind="stable"))
    per_query = ours.rerank(["query", "python code"], [TEXTS, TEXTS[:2]], top_k=2)
    # the same pairs in another batch: the same ranking, scores within fp32 rounding (a batch's size picks its kernels)
    assert [r["corpus_id"] for r in per_query[0]] == [r["corpus_id"] for r in ranked[:2]] and len(per_query[1]) == 2
    assert max(abs(a["score"] - b["score"]) for a, b in zip(per_query[0], ranked)) <= 1e-6


def test_cross_encoder_sentence_transformers_directory(tmp_path):
    """A directory written by sentence-transformers' CrossEncoder.save (modules.json, its activation_fn)."""
    from sentence_transformers import CrossEncoder as STCrossEncoder
    save_with_tokenizer(make("mpnet", 0, "seq", num_labels=1), tmp_path / "hf")
    theirs = STCrossEncoder(str(tmp_path / "hf"), device="cpu", activation_fn=torch.nn.Identity())
    theirs.save(str(tmp_path / "st"))
    ours = padfree.CrossEncoder.from_pretrained(tmp_path / "st")
    pairs = [("query", p) for p in TEXTS]
    assert ours.activation == "identity"
    assert np.abs(ours.score(pairs) - theirs.predict(pairs, convert_to_numpy=True)).max() <= FP32_TOL


@pytest.mark.parametrize("family", list(ZOO))
def test_sentence_embeddings_every_family(family, tmp_path):
    model = make(family, 0)
    st = padfree.SentenceEncoder.from_pretrained(save_with_tokenizer(model, tmp_path))
    emb = st.encode(TEXTS, batch_tokens=24)
    tok = tokenizer()
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0].mean(0)
        assert np.abs(emb[i] - ref.numpy()).max() <= FP32_TOL, f"{family} text {i}"
