"""SPLADE sparse embeddings: padfree's SparseEncoder against sentence-transformers' SparseEncoder on random-weight
masked-LM checkpoints (saved by sentence-transformers' own classes), its bad inputs, and ``/embed_sparse`` on a
real server process."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import transformers as t

import padfree
from padfree.bench.corpus import stdlib_paragraphs
from padfree.sparse import MLMHead
from padfree.startup import load_pipeline

from family_zoo import randomize
from serving import TOKENIZER_FILES, Server, minilm_path

MAX_SEQ_LENGTH = 48  # small, so that many texts are cut
VALUE_TOL = 1e-4
VOCAB_BIAS_SHIFT = -2.5  # random heads put most vocabulary entries above 0; real SPLADE vectors are sparse

# name -> (config class, *ForMaskedLM class, config, vocabulary bias key)
MODELS = {
    "bert": (t.BertConfig, t.BertForMaskedLM, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=128), "cls.predictions.bias"),
    "bert-wide": (t.BertConfig, t.BertForMaskedLM, dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                                                        intermediate_size=160, hidden_act="gelu_new",
                                                        layer_norm_eps=1e-5), "cls.predictions.bias"),
    "distilbert": (t.DistilBertConfig, t.DistilBertForMaskedLM, dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                   "vocab_projector.bias"),
    "roberta": (t.RobertaConfig, t.RobertaForMaskedLM, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                            intermediate_size=128, pad_token_id=1, type_vocab_size=1,
                                                            max_position_embeddings=514), "lm_head.bias"),
}


def mlm_dir(path: Path, name: str, seed: int = 0) -> Path:
    """A random-weight ``*ForMaskedLM`` with MiniLM's real tokenizer (so that real texts work)."""
    cfg_cls, model_cls, cfg, bias = MODELS[name]
    torch.manual_seed(seed)
    model = randomize(model_cls(cfg_cls(vocab_size=30522, **cfg)), seed, std=0.1)
    with torch.no_grad():
        model.get_parameter(bias).add_(VOCAB_BIAS_SHIFT)
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, path / f)
    return path


def splade_dir(path: Path, mlm: Path, pooling_strategy: str = "max", activation_function: str = "relu",
               legacy: bool = True) -> Path:
    """``mlm`` saved as a sentence-transformers SparseEncoder directory: MLMTransformer (``legacy``, the layout of
    the published SPLADE models) or Transformer with ``transformer_task="fill-mask"``, then SpladePooling."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling, Transformer
    first = MLMTransformer(str(mlm), max_seq_length=MAX_SEQ_LENGTH) if legacy else \
        Transformer(str(mlm), transformer_task="fill-mask", max_seq_length=MAX_SEQ_LENGTH)
    st = SparseEncoder(modules=[first, SpladePooling(pooling_strategy, activation_function)], device="cpu")
    st.save(str(path))
    return path


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real texts of mixed lengths: paragraphs past the limit of 48 tokens, short snippets, one character."""
    paragraphs = stdlib_paragraphs(limit=60)
    rng = random.Random(0)
    return paragraphs[:12] + [" ".join(p.split()[:rng.randint(1, 10)]) for p in paragraphs[12:24]] + ["x", "A"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("splade")


def dense(x: torch.Tensor) -> torch.Tensor:
    return x.coalesce().to_dense()


def assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same non-zero entries, values within VALUE_TOL. An entry may be zero in one and not the other only where its
    value is within VALUE_TOL of zero: a logit at the ReLU's edge, which fp32 rounding may put on either side
    (seen: 4.8e-7 against 0 on the EPYC, where the products take other kernels than the Xeon's)."""
    assert ours.shape == theirs.shape
    a, b = dense(ours), dense(theirs)
    edge = (a != 0) != (b != 0)
    at_edge = torch.maximum(a[edge].abs(), b[edge].abs())
    assert at_edge.numel() == 0 or float(at_edge.max()) <= VALUE_TOL, \
        f"{int(edge.sum())} entries differ in being non-zero, some by more than {VALUE_TOL}"
    assert int(edge.sum()) <= max(1, int((b != 0).sum()) // 1000), f"{int(edge.sum())} entries differ in being non-zero"
    assert float((a - b).abs().max()) <= VALUE_TOL


CASES = [("bert", "max", "relu"), ("bert-wide", "max", "relu"), ("distilbert", "max", "relu"),
         ("roberta", "max", "relu"), ("bert", "sum", "log1p_relu")]


@pytest.mark.parametrize("name,strategy,activation", CASES, ids=["-".join(c) for c in CASES])
def test_matches_sentence_transformers_sparse_encoder(root, texts, name, strategy, activation, monkeypatch):
    from sentence_transformers import SparseEncoder
    path = splade_dir(root / f"st-{name}-{strategy}", mlm_dir(root / f"mlm-{name}-{strategy}", name),
                      strategy, activation)
    theirs = SparseEncoder(str(path), device="cpu").encode(texts)
    ours = padfree.SparseEncoder.from_pretrained(path)
    assert ours.max_seq_length == MAX_SEQ_LENGTH and ours.pooling_strategy == strategy
    assert ours.activation_function == activation
    assert max(map(len, ours.tokenize(texts[:12], truncate=True))) == MAX_SEQ_LENGTH  # texts past the limit: cut
    got = ours.encode(texts)
    assert got.is_sparse and got.is_coalesced() and got.dtype == torch.float32
    nnz = (dense(theirs) != 0).sum(1)
    assert 0 < int(nnz.min()) and int(nnz.max()) < 30522 // 4, nnz  # sparse, as SPLADE vectors are
    assert_same(got, theirs)
    # small chunks of tokens (a sequence spread over several chunks) and small batches give the same vectors;
    # the head sees each real token once (no pad) and never more than a chunk of them at a time
    rows, head = [], MLMHead.__call__
    monkeypatch.setattr(MLMHead, "__call__", lambda self, h: (rows.append(len(h)), head(self, h))[1])
    ours.head_tokens = 7
    assert_same(ours.encode(texts, batch_tokens=100), theirs)
    assert max(rows) == 7 and sum(rows) == sum(map(len, ours.tokenize(texts)))
    one = ours.encode(texts[3])
    assert one.shape == (30522,)
    assert_same(one, theirs[3])


def test_transformer_fill_mask_layout_and_prompts(root, texts):
    """sentence-transformers 6's own layout (Transformer, transformer_task fill-mask) and a prompt."""
    from sentence_transformers import SparseEncoder
    path = splade_dir(root / "fill-mask", mlm_dir(root / "fill-mask-mlm", "bert-wide", seed=3), legacy=False)
    assert "transformer_task" in (path / "sentence_bert_config.json").read_text()
    theirs = SparseEncoder(str(path), device="cpu")
    ours = padfree.SparseEncoder.from_pretrained(path)
    assert_same(ours.encode(texts), theirs.encode(texts))
    assert_same(ours.encode(texts[10:16], prompt="query: "), theirs.encode(texts[10:16], prompt="query: "))
    conf = path / "sentence_bert_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "transformer_task": "feature-extraction"}))
    with pytest.raises(ValueError, match="transformer_task 'feature-extraction'; SPLADE needs 'fill-mask'"):
        padfree.SparseEncoder.from_pretrained(path)


def test_plain_masked_lm_directory(root, texts):
    """A ``*ForMaskedLM`` directory without modules.json: max pooling and relu, as sentence-transformers reads it."""
    from sentence_transformers import SparseEncoder
    mlm = mlm_dir(root / "plain", "bert", seed=5)
    theirs = SparseEncoder(str(mlm), device="cpu")
    theirs.max_seq_length = MAX_SEQ_LENGTH
    ours = padfree.SparseEncoder.from_pretrained(mlm, max_seq_length=MAX_SEQ_LENGTH)
    assert_same(ours.encode(texts), theirs.encode(texts))
    rows = ours.encode(texts[:3], convert_to_sparse_tensor=False)
    ref = dense(ours.encode(texts[:3]))
    for r, (idx, val) in enumerate(rows):
        assert torch.equal(idx, ref[r].nonzero().squeeze(1)) and torch.equal(val, ref[r][idx])
    assert load_pipeline(mlm).kind == "sparse"


def test_bad_inputs(root, tmp_path):
    base = tmp_path / "base"
    torch.manual_seed(0)
    t.BertModel(t.BertConfig(vocab_size=30522, **MODELS["bert"][2])).save_pretrained(base)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm_path() / f, base / f)
    with pytest.raises(ValueError, match=r"no masked-LM head .*\*ForMaskedLM.*BertModel"):
        padfree.SparseEncoder.from_pretrained(base)
    with pytest.raises(ValueError, match="is neither a directory nor a Hugging Face Hub ID"):
        padfree.SparseEncoder.from_pretrained(tmp_path / "nope")

    path = splade_dir(tmp_path / "st", mlm_dir(tmp_path / "mlm", "bert"))
    pooling = path / "1_SpladePooling" / "config.json"
    conf = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**conf, "pooling_strategy": "mean"}))
    with pytest.raises(ValueError, match=r"pooling_strategy 'mean'; padfree supports \('max', 'sum'\)"):
        padfree.SparseEncoder.from_pretrained(path)
    pooling.write_text(json.dumps(conf))
    modules = json.loads((path / "modules.json").read_text())
    (path / "modules.json").write_text(json.dumps(modules + [{"idx": 2, "name": "2", "path": "",
                                                              "type": "sentence_transformers.models.Normalize"}]))
    with pytest.raises(ValueError, match="unsupported sentence-transformers module .*Normalize"):
        padfree.SparseEncoder.from_pretrained(path)
    (path / "modules.json").write_text(json.dumps(modules))
    enc = padfree.SparseEncoder.from_pretrained(path)
    with pytest.raises(ValueError, match="more than the limit of 48"):
        enc.encode(["word " * 100], truncate=False)
    with pytest.raises(ValueError, match="head_tokens must be an int >= 1"):
        padfree.SparseEncoder(enc.encoder, enc.text, enc.head, head_tokens=0)
    empty = enc.encode([])
    assert empty.shape == (0, 30522) and empty._nnz() == 0


@pytest.fixture(scope="module")
def splade_server(root, tmp_path_factory):
    path = splade_dir(root / "served", mlm_dir(root / "served-mlm", "bert", seed=7))
    s = Server(["--model", f"splade={path}", "--max-batch-tokens", "256"],
               tmp_path_factory.mktemp("logs") / "server.log")
    yield s, path
    assert s.stop() == 0, s.log()


def assert_row(got: list[dict], idx: torch.Tensor, val: torch.Tensor, tol: float = 1e-5) -> None:
    """One ``/embed_sparse`` row against the library's ``(indices, values)``."""
    assert [e["index"] for e in got] == idx.tolist()
    assert max(abs(e["value"] - v) for e, v in zip(got, val.tolist())) <= tol


def test_embed_sparse_route(splade_server, texts):
    server, path = splade_server
    lib = padfree.SparseEncoder.from_pretrained(path)
    rows = lib.encode(texts, convert_to_sparse_tensor=False)
    r = httpx.post(server.url + "/embed_sparse", json={"inputs": texts, "truncate": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.json()) == len(texts)
    for got, (idx, val) in zip(r.json(), rows):
        assert_row(got, idx, val)
    one = httpx.post(server.url + "/embed_sparse", json={"inputs": texts[14]}, timeout=60).json()
    assert len(one) == 1  # TEI answers a list per input, also for one string (a short one: no truncate needed)
    assert_row(one[0], *rows[14])
    n = next(i for i, e in enumerate(lib.tokenizer.encode(texts)) if len(e.ids) > 2 * MAX_SEQ_LENGTH)
    left = httpx.post(server.url + "/embed_sparse", json={"inputs": texts[n], "truncate": True,
                                                          "truncation_direction": "Left"}, timeout=60).json()
    assert_row(left[0], *lib.pooled(*_forward(lib, lib.tokenize([texts[n]], truncation_side="left")))[0])
    assert [e["index"] for e in left[0]] != rows[n][0].tolist()  # the other end of the text was kept
    too_long = httpx.post(server.url + "/embed_sparse", json={"inputs": [texts[n]], "truncate": False}, timeout=60)
    assert too_long.status_code == 413 and "more than the limit of 48" in too_long.json()["error"]
    empty = httpx.post(server.url + "/embed_sparse", json={"inputs": []}, timeout=60)
    assert empty.status_code == 422 and "`inputs` is empty" in empty.json()["error"]
    wrong = httpx.post(server.url + "/embed", json={"inputs": "a"}, timeout=60)
    assert wrong.status_code == 400 and "it serves sparse embeddings" in wrong.json()["error"]
    info = httpx.get(server.url + "/info", timeout=60).json()
    assert info["model_type"] == {"embedding": {"pooling": "splade"}} and info["max_input_length"] == 48


def _forward(enc: padfree.SparseEncoder, ids: list[list[int]]):
    batch = padfree.PackedBatch.from_sequences(ids)
    with torch.inference_mode():
        return enc.encoder.forward_packed(batch), batch
