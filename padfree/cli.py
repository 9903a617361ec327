"""The ``padfree`` command line: ``padfree demo``, ``serve``, ``embed``, ``classify`` and ``bench``."""
from __future__ import annotations

import argparse
import sys
import time

from .cpu import DTYPE_CHOICES


def demo(args: argparse.Namespace) -> None:
    """Embed a real corpus with all-MiniLM-L6-v2: padfree beside sentence-transformers, same texts."""
    import numpy as np
    import torch

    import padfree
    from padfree.bench.corpus import stdlib_paragraphs

    from padfree.hub import resolve_model
    from padfree.startup import bundled_model_path, parse_dtype
    try:  # a Hub ID resolved once: padfree and sentence-transformers read the same snapshot
        path = str(resolve_model(args.model)) if args.model else bundled_model_path()
    except ValueError as e:
        sys.exit(f"padfree demo: error: {e}")
    dtype = parse_dtype(args.dtype)
    texts = stdlib_paragraphs(limit=args.texts)
    enc = padfree.SentenceEncoder.from_pretrained(path, dtype=dtype)
    n_tokens = sum(len(t) for t in enc.tokenize(texts))
    print(f"corpus: {len(texts)} paragraphs of Python standard-library docstrings, {n_tokens} tokens "
          f"(mean {n_tokens / len(texts):.1f}); model: {args.model or path}; {str(dtype).removeprefix('torch.')}; {torch.get_num_threads()} threads")
    enc.encode(texts[:64])  # warm-up
    t0 = time.perf_counter()
    ours = enc.encode(texts, batch_tokens=args.batch_tokens, show_progress_bar=True)
    t_ours = time.perf_counter() - t0

    from sentence_transformers import SentenceTransformer
    st_dtype = torch.float32 if dtype == torch.int8 else dtype  # sentence-transformers has no int8 of padfree's kind
    st = SentenceTransformer(path, device="cpu", model_kwargs={"torch_dtype": st_dtype})
    st.encode(texts[:64])
    t0 = time.perf_counter()
    theirs = st.encode(texts, batch_size=32, show_progress_bar=True, convert_to_numpy=True).astype(np.float32)
    t_st = time.perf_counter() - t0

    cos = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    print(f"\n{'system':<38}{'seconds':>9}{'texts/s':>10}{'tokens/s':>11}")
    for name, t in ((f"padfree ({dtype}, arrival order)", t_ours),
                    (f"sentence-transformers encode() ({st_dtype})", t_st)):
        print(f"{name:<38}{t:>9.2f}{len(texts) / t:>10.1f}{n_tokens / t:>11.0f}")
    print(f"speedup: {t_st / t_ours:.2f}x   minimum cosine similarity: {cos.min():.7f}")


def info(args) -> None:
    """``padfree info``: the CPU profile, the plan of paths it gives (with the reason for each), the native
    module's state, and the path a batch of each size takes."""
    import json

    from padfree import cpu, info as cpu_info

    if args.example is not None and args.example not in cpu.EXAMPLES:
        sys.exit(f"padfree info: unknown CPU kind {args.example!r}; known: {', '.join(cpu.EXAMPLES)}")
    report = cpu_info.report(cpu.current() if args.example is None else cpu.plan_for(cpu.EXAMPLES[args.example]),
                        this_machine=args.example is None)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    c, plan = report["cpu"], report["plan"]
    print(f"CPU: {c['model']} ({c['uarch']}; {c['vendor']} family {c['family']} model {c['model_number']}), "
          f"{c['cores']} cores, L2 {c['l2_kib']} KiB, L3 {c['l3_kib']} KiB")
    print(f"features: {' '.join(c['features']) or '(none of those padfree dispatches on)'}")
    print(f"dtype auto: {report['dtype_auto']}")
    print("plan:")
    for key, value in plan.items():
        why = report["reasons"].get(key)
        print(f"  {key:18} {value!s:8}" + (f"  ({why})" if why else ""))
    print(f"  row limits: {report['reasons']['row_limits']}")
    if "native_module" in report:
        print(f"native module: {report['native_module']}")
    print("a batch of N tokens runs:")
    for dtype, paths in report["paths"].items():
        print(f"  {dtype}: " + "; ".join(f"{n}: {p}" for n, p in paths.items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="padfree", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="embed a real corpus with the bundled all-MiniLM-L6-v2, beside sentence-transformers")
    d.add_argument("--texts", type=int, default=3000, help="number of docstring paragraphs (default 3000)")
    d.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: the fastest on this CPU (padfree info says which)")
    d.add_argument("--batch-tokens", type=int, default=8192, help="real-token budget per batch")
    d.add_argument("--model", help="a sentence-transformers directory or Hub ID, org/name (default: the bundled "
                                   "all-MiniLM-L6-v2)")
    d.set_defaults(run=demo)
    i = sub.add_parser("info", help="this machine's CPU profile and the paths padfree takes on it")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--as", dest="example", metavar="KIND",
                   help="the plan of another CPU kind instead (one of padfree.cpu.EXAMPLES: zen3, zen4, ...)")
    i.set_defaults(run=info)
    for name, what in (("serve", "the HTTP server: OpenAI, text-embeddings-inference and Cohere routes "
                                 "(see padfree serve --help)"),
                       ("embed", "embed a Parquet/JSONL/CSV input into Parquet shards, resumable"),
                       ("classify", "classify a Parquet/JSONL/CSV input into Parquet shards, resumable"),
                       ("bench", "benchmarks (see padfree bench --help)")):
        sub.add_parser(name, help=what, add_help=False).set_defaults(run=None)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from padfree.bench.run import main as bench_main
        bench_main(rest)
        return
    if args.command in ("embed", "classify"):
        from padfree.jobs.cli import main as job_main
        job_main(args.command, rest)
        return
    if args.command == "serve":
        from padfree.serve.cli import main as serve_main
        serve_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
