"""Late chunking (``SentenceEncoder.encode_chunks``, ``POST /embed`` with ``chunks`` / ``chunk_tokens``) against
an oracle: transformers' hidden states of the whole document, pooled by hand over each chunk's tokens (taken from
transformers' tokenizer offsets), on two random-weight BERT shapes and the real all-MiniLM-L6-v2."""
from __future__ import annotations

import json
import random
import re
import shutil

import httpx
import numpy as np
import pytest
import torch
import transformers as t

import padfree
from padfree.bench.corpus import stdlib_paragraphs

from family_zoo import randomize
from serving import TOKENIZER_FILES, Server, minilm_path

TOL = 1e-5  # max abs difference, fp32

# (hidden, layers, heads, max positions, max_seq_length, pooling flags of sentence-transformers, Normalize)
SHAPES = {
    "bert-a": (64, 2, 4, 512, 256, {"pooling_mode_mean_tokens": True}, True),
    "bert-b": (96, 3, 6, 64, 64, {"pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}, False),
}


def st_dir(path, shape: str, seed: int = 0, pooling: dict | None = None):
    """A sentence-transformers directory around a random-weight BertModel with MiniLM's tokenizer."""
    hidden, layers, heads, positions, max_len, flags, norm = SHAPES[shape]
    cfg = t.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=2 * hidden, max_position_embeddings=positions)
    torch.manual_seed(seed)
    randomize(t.BertModel(cfg), seed, std=0.1).save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, path / f)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if norm:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": hidden,
                                                                **(pooling or flags)}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    return {"bert-a": st_dir(root / "bert-a", "bert-a", 1), "bert-b": st_dir(root / "bert-b", "bert-b", 2),
            "minilm": minilm_path()}


_models: dict = {}


def models(path):
    """(padfree SentenceEncoder, transformers tokenizer, transformers model), loaded once per directory."""
    if path not in _models:
        _models[path] = (padfree.SentenceEncoder.from_pretrained(path), t.AutoTokenizer.from_pretrained(str(path)),
                         t.AutoModel.from_pretrained(str(path)).eval())
    return _models[path]


def oracle(path, docs, spans=None, chunk_tokens=None, prompt=""):
    """Per document: (vectors [n_chunks, D], spans), from transformers' hidden states of the whole text (prompt +
    document, cut at max_seq_length), pooled in float64 over each chunk's tokens: for spans, the tokens with a
    character in [start, end); for chunk_tokens, windows of the tokens that are not special tokens."""
    enc, tok, hf = models(path)
    modes = enc.pooling
    out = []
    for i, doc in enumerate(docs):
        e = tok(prompt + doc, return_offsets_mapping=True, return_special_tokens_mask=True, truncation=True,
                max_length=enc.max_seq_length)
        with torch.no_grad():
            h = hf(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0].double()
        offsets = [(a - len(prompt), b - len(prompt)) for a, b in e["offset_mapping"]]
        words = [k for k, sp in enumerate(e["special_tokens_mask"]) if not sp and offsets[k][1] > 0]
        if chunk_tokens is None:
            chunks = [[k for k in words if max(offsets[k][0], s) < min(offsets[k][1], end)] for s, end in spans[i]]
            got_spans = list(spans[i])
        else:
            chunks = [words[k:k + chunk_tokens] for k in range(0, len(words), chunk_tokens)]
            got_spans = [(max(offsets[c[0]][0], 0), offsets[c[-1]][1]) for c in chunks]
        rows = []
        for c in chunks:
            x = h[c]
            pooled = {"mean": x.mean(0), "max": x.max(0).values, "mean_sqrt_len": x.sum(0) / len(c) ** 0.5}
            v = torch.cat([pooled[m] for m in modes])
            rows.append(torch.nn.functional.normalize(v, dim=0) if enc.normalize_embeddings else v)
        out.append((torch.stack(rows).numpy() if rows else np.zeros((0, enc.dimension)), got_spans))
    return out


def assert_matches(got, want):
    assert len(got) == len(want)
    for (emb, spans), (ref, ref_spans) in zip(got, want):
        assert emb.dtype == np.float32 and emb.shape == ref.shape
        assert spans == ref_spans
        assert float(np.abs(emb - ref).max(initial=0)) <= TOL


SHORT = "Late chunking keeps the context."


@pytest.fixture(scope="module")
def documents():
    """Real paragraphs of mixed lengths, from 16 tokens to past MiniLM's 256 (first), and a short text that
    makes a single chunk."""
    by_len = sorted(stdlib_paragraphs(limit=300), key=len)
    longest = max(stdlib_paragraphs()[:3000], key=len)  # 704 tokens
    return [longest, by_len[299], SHORT, by_len[280], by_len[250], by_len[100], by_len[220]]


def sentence_spans(doc: str, seed: int) -> list[tuple[int, int]]:
    """The sentences of ``doc`` (surrounding whitespace left out), a span from mid-word, and one over them all."""
    spans = [(m.start(), m.start() + len(m.group().rstrip())) for m in re.finditer(r"[^\s.!?][^.!?]*[.!?]*", doc)]
    rng = random.Random(seed)
    a = rng.randrange(1, max(2, len(doc) // 2))
    return spans + [(a, min(len(doc), a + rng.randint(3, 40))), (spans[0][0], spans[-1][1])]


@pytest.mark.parametrize("name", ["bert-a", "bert-b", "minilm"])
def test_spans_match_transformers(paths, documents, name):
    enc = models(paths[name])[0]
    limit = enc.max_seq_length
    docs = [d for d in documents if len(enc.tokenizer.encode([d])[0].ids) <= limit]  # the whole text is read
    assert len(docs) >= 5
    spans = [sentence_spans(d, k) for k, d in enumerate(docs)]
    one = docs.index(SHORT)
    spans[one] = [(0, len(SHORT))]  # one chunk: the whole document
    got = enc.encode_chunks(docs, chunks=spans, batch_tokens=150)  # several token-budget batches
    assert_matches(got, oracle(paths[name], docs, spans))
    assert got[one].embeddings.shape == (1, enc.dimension)


@pytest.mark.parametrize("name", ["bert-a", "bert-b", "minilm"])
def test_chunk_tokens_match_transformers(paths, documents, name):
    enc = models(paths[name])[0]
    docs = documents + ["Tiny."]  # with the long ones cut at max_seq_length, as encode cuts them
    got = enc.encode_chunks(docs, chunk_tokens=7, batch_tokens=200)
    assert_matches(got, oracle(paths[name], docs, chunk_tokens=7))
    assert len(got[-1].spans) == 1 and got[-1].spans == [(0, 5)]  # a document of one chunk
    for doc, (emb, spans) in zip(docs, got):
        assert spans[0][0] == len(doc) - len(doc.lstrip())  # chunks start at the text, not at [CLS]
        assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))
    assert enc.encode_chunks([SHORT], chunk_tokens=1000)[0].spans == [(0, len(SHORT))]


def test_prompt_is_context_not_chunk(paths, documents):
    enc = models(paths["minilm"])[0]
    docs = documents[1:4]
    spans = [sentence_spans(d, k) for k, d in enumerate(docs)]
    got = enc.encode_chunks(docs, chunks=spans, prompt="query: ")
    assert_matches(got, oracle(paths["minilm"], docs, spans, prompt="query: "))
    got = enc.encode_chunks(docs, chunk_tokens=5, prompt="query: ")
    assert_matches(got, oracle(paths["minilm"], docs, chunk_tokens=5, prompt="query: "))


def test_long_document_cut_at_the_limit(paths, documents):
    path = paths["bert-b"]  # max_seq_length 64
    enc = models(path)[0]
    doc = documents[0]
    e = enc.tokenizer.encode([doc], max_length=64)[0]
    read_end = e.offsets[-2][1]  # the last character the model reads ([SEP] closes the cut text)
    assert read_end < len(doc) - 100
    spans = [[(0, 20), (read_end - 10, read_end + 50)]]  # the second runs past the cut
    got = enc.encode_chunks([doc], chunks=spans)
    assert_matches(got, oracle(path, [doc], spans))
    windows = enc.encode_chunks([doc], chunk_tokens=10)[0]
    assert len(windows.spans) == 7 and windows.spans[-1][1] == read_end  # 62 tokens read, in windows of 10
    with pytest.raises(ValueError, match=rf"document 0 chunk 1 \({read_end + 5}, {read_end + 30}\) lies past the "
                                         rf"model's limit of 64 tokens: the model reads characters 0..{read_end}"):
        enc.encode_chunks([doc], chunks=[[(0, 5), (read_end + 5, read_end + 30)]])
    from padfree.tokenizer import InputTooLong  # a ValueError the server answers with 413
    with pytest.raises(InputTooLong, match=r"text 0 has \d+ tokens, more than the limit of 64"):
        enc.encode_chunks([doc], chunk_tokens=10, truncate=False)


def test_bad_input(paths):
    enc = models(paths["bert-a"])[0]
    docs = ["One sentence.  Two.", "Three"]
    ok = [[(0, 13)], [(0, 5)]]
    for kwargs, message in [
        ({"chunks": ok, "chunk_tokens": 4}, "either chunks .* or chunk_tokens .*, not both"),
        ({}, r"either chunks \(character spans per document\) or chunk_tokens \(a window size in tokens\)$"),
        ({"chunks": ok[:1]}, "chunks has 1 lists of spans for 2 documents"),
        ({"chunks": 5}, "one list of .* spans per document"),
        ({"chunks": [[(5, 3)], []]}, r"document 0 chunk 0: start 5 > end 3"),
        ({"chunks": [[(0, 13), (4, 4)], []]}, r"document 0 chunk 1 is empty: start == end == 4"),
        ({"chunks": [[], [(0, 6)]]}, r"document 1 chunk 0 \(0, 6\) is out of range: the document has 5 characters"),
        ({"chunks": [[(-1, 3)], []]}, r"document 0 chunk 0 \(-1, 3\) is out of range"),
        ({"chunks": [[(0, 1.5)], []]}, r"document 0 chunk 0: a span is a pair \(start, end\) of ints; got \(0, 1.5\)"),
        ({"chunks": [[(0, 1, 2)], []]}, r"a span is a pair"),
        ({"chunks": [[(13, 15)], []]}, r"document 0 chunk 0 \(13, 15\) covers no token"),  # two spaces
        ({"chunk_tokens": 0}, r"chunk_tokens must be an int >= 1; got 0"),
        ({"chunk_tokens": True}, r"chunk_tokens must be an int >= 1; got True"),
        ({"chunk_tokens": 4, "batch_tokens": 0}, "batch_tokens"),
    ]:
        with pytest.raises(ValueError, match=message):
            enc.encode_chunks(docs, **kwargs)
    with pytest.raises(ValueError, match="document 1 is not a string"):
        enc.encode_chunks(["a", None], chunk_tokens=3)
    empty = enc.encode_chunks(docs, chunks=[[], [(0, 5)]])  # no chunk asked for: no row
    assert empty[0].embeddings.shape == (0, enc.dimension) and empty[0].spans == []
    assert enc.encode_chunks([], chunk_tokens=3) == []
    nothing = enc.encode_chunks(["", "x"], chunk_tokens=3)[0]  # an empty document has no token to chunk
    assert nothing.embeddings.shape == (0, enc.dimension) and nothing.spans == []


def test_per_text_pooling_is_refused(tmp_path):
    enc = padfree.SentenceEncoder.from_pretrained(st_dir(tmp_path, "bert-a", pooling={"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="this model pools with 'cls' .*no per-chunk meaning"):
        enc.encode_chunks(["a b c"], chunk_tokens=2)


def test_lowercasing_model_maps_offsets_back(tmp_path, paths):
    """With do_lower_case, 'İ' lowers to two characters: spans still count characters of the document."""
    d = tmp_path / "lower"
    shutil.copytree(paths["bert-a"], d)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": True}))
    enc, tok, hf = padfree.SentenceEncoder.from_pretrained(d), t.AutoTokenizer.from_pretrained(str(d)), \
        t.AutoModel.from_pretrained(str(d)).eval()
    doc = "İstanbul is large. Ankara is the capital."
    start = doc.index("Ankara")
    got = enc.encode_chunks([doc], chunks=[[(start, len(doc))]])[0].embeddings
    lowered = doc.lower()
    assert len(lowered) == len(doc) + 1
    e = tok(lowered, return_offsets_mapping=True)
    with torch.no_grad():
        h = hf(input_ids=torch.tensor([e["input_ids"]])).last_hidden_state[0]
    rows = [k for k, (a, b) in enumerate(e["offset_mapping"]) if b > a and a >= lowered.index("ankara")]
    want = torch.nn.functional.normalize(h[rows].double().mean(0), dim=0).numpy()
    assert np.abs(got[0] - want).max() <= TOL


def test_embed_pipeline_batches_chunked_and_plain_inputs_together(paths, documents):
    """The server's path: one pipeline run over plain and chunked sequences (as the scheduler may batch
    requests), each with its own output options."""
    lib = models(paths["minilm"])[0]
    pipeline = lib.pipeline
    docs = documents[1:4]
    plain = pipeline.prepare(docs, truncate=True, normalize=False)
    chunked = pipeline.prepare(docs, truncate=True, chunk_tokens=6, normalize=True)
    rows = pipeline.run(chunked[:1] + plain + chunked[1:])
    ref = lib.encode_chunks(docs, chunk_tokens=6, normalize_embeddings=True)
    for r, c in zip(rows[:1] + rows[4:], ref):
        assert r.shape == c.embeddings.shape and np.abs(r - c.embeddings).max() <= TOL
    assert np.abs(np.stack(rows[1:4]) - lib.encode(docs, normalize_embeddings=False)).max() <= TOL


@pytest.fixture(scope="module")
def server(paths, tmp_path_factory):
    s = Server(["--model", f"minilm={paths['minilm']}", "--model", f"bert-b={paths['bert-b']}",
                "--max-batch-tokens", "300"], tmp_path_factory.mktemp("logs") / "server.log")
    yield s
    assert s.stop() == 0, s.log()


def test_embed_route_late_chunking(server, paths, documents):
    docs = documents[1:5]
    enc = models(paths["minilm"])[0]
    spans = [sentence_spans(d, k) for k, d in enumerate(docs)]
    r = httpx.post(server.url + "/embed", json={"inputs": docs, "chunks": spans}, timeout=120)
    assert r.status_code == 200, r.text
    for got, want in zip(r.json(), enc.encode_chunks(docs, chunks=spans)):
        assert [tuple(x) for x in got["spans"]] == want.spans
        assert np.abs(np.array(got["embeddings"]) - want.embeddings).max() <= TOL
    r = httpx.post(server.url + "/embed", json={"inputs": docs, "chunk_tokens": 9, "model": "bert-b",
                                                "truncate": True, "normalize": False, "dimensions": 100}, timeout=120)
    assert r.status_code == 200, r.text
    for got, want in zip(r.json(), models(paths["bert-b"])[0].encode_chunks(docs, chunk_tokens=9)):
        assert [tuple(x) for x in got["spans"]] == want.spans
        assert np.abs(np.array(got["embeddings"]) - want.embeddings[:, :100]).max() <= TOL
    for body, status, message in [
        ({"inputs": docs[:2], "chunks": spans[:1]}, 422, "chunks has 1 lists of spans for 2 documents"),
        ({"inputs": docs[:1], "chunks": [[[5, 2]]]}, 422, "document 0 chunk 0: start 5 > end 2"),
        ({"inputs": docs[:1], "chunks": [[[0, 3]]], "chunk_tokens": 3}, 422, "not both"),
        ({"inputs": docs[:1], "chunk_tokens": 0}, 422, "`chunk_tokens`"),
        ({"inputs": [documents[0]], "chunk_tokens": 8, "model": "bert-b"}, 413, "more than the limit of 64"),
    ]:
        r = httpx.post(server.url + "/embed", json=body, timeout=120)
        assert r.status_code == status and message in r.json()["error"], r.text
    schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    assert {"chunks", "chunk_tokens"} <= set(schema["EmbedRequest"]["properties"])
    assert set(schema["ChunkedEmbeddings"]["properties"]) == {"embeddings", "spans"}
