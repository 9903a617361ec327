"""Latency saved by CUDA-graph replay (padfree.cuda_graphs) on small batches, BERT-base random weights.

Usage: python benchmarks/gpu_graphs.py [--json PATH] [--markdown PATH]
Times eager ``forward_packed`` and graph replay side by side (``triton.testing.do_bench``, median).
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import torch

import padfree
from padfree.cuda_graphs import CudaGraphEncoder


def time_ms(fn):
    """Median ms of ``fn()`` (``triton.testing.do_bench``: CUDA events, L2 flushed before each call)."""
    from triton.testing import do_bench
    return do_bench(fn, return_mode="median")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    hf = BertModel(BertConfig()).eval()
    enc = padfree.from_pretrained(hf, dtype=torch.float16, device="cuda")
    runner = CudaGraphEncoder(enc, buckets=(64, 128, 256, 512, 1024, 2048), max_batch=64)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch_size, max_len in ((1, 16), (1, 64), (1, 128), (4, 64), (4, 128), (8, 128), (16, 64), (16, 128)):
        lengths = torch.randint(max(1, int(0.2 * max_len)), max_len + 1, (batch_size,), generator=g).tolist()
        batch = padfree.PackedBatch.from_sequences(
            [torch.randint(1000, 30000, (n,), generator=g).tolist() for n in lengths], device="cuda")
        eager = time_ms(lambda: enc.forward_packed(batch, check=False))
        graph = time_ms(lambda: runner.forward_packed(batch, check=False))
        rows.append(dict(batch=batch_size, max_len=max_len, tokens=sum(lengths), eager_ms=eager, graph_ms=graph,
                         speedup=eager / graph))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                dtype="float16", model="bert-base random weights",
                git=os.environ.get("PADFREE_GIT_REV", "unknown"))
    lines = [f"CUDA graphs vs eager, {meta['gpu']}, torch {meta['torch']}, fp16 BERT-base, git {meta['git']}", "",
             "| batch | max len | tokens | eager ms | graph ms | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['max_len']} | {r['tokens']} | {r['eager_ms']:.3f} | {r['graph_ms']:.3f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
