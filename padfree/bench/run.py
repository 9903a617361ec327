"""``padfree bench``: W1 (the ByteTransformer protocol), W2 (a real corpus) and W3 (latency of small requests),
side by side with the baselines.

Examples::

    padfree bench --quick                                  # W1 + W2, fp32 and bf16 on CPU, ~11 min on 2 cores
    padfree bench --quick --json 'benchmarks/results/cpu-epyc-2c-{workload}.json' \\
        --markdown 'benchmarks/results/cpu-epyc-2c-{workload}.md' --plot benchmarks/results/cpu-epyc-2c-w1.png
    padfree bench --device cuda --dtype fp16,bf16          # GPU: adds the varlen_attn packed baseline
    padfree bench --workload w3                            # latency: batch 1/4, 8-128 tokens, MiniLM and BERT-base
    padfree bench --workload w1-long                       # long documents: ModernBERT-base, max 1024-8192
    padfree bench --workload serve                         # HTTP servers under load (serve.py; runs alone)

A ``{workload}`` in an output path writes one file per workload (w1, w1-long, w2, w3); without it, one file holds
all. W1-long is W1 at long lengths on the ModernBERT-base shape (batch 2, max 1024-8192, lengths uniform in
[0.2 max, max]), each batch padded to its longest sequence (``padding=True``) for the padded systems, 1 warm-up
and 3 timed runs (a padded 8192-token batch takes minutes on 2 cores); its systems: padfree, transformers sdpa,
OpenVINO.
Timed runs (``RunPolicy``): full sweep 1 warm-up + 10 timed runs; ``--quick`` 1 warm-up + 5 timed runs, cut to
no fewer than 3 where a configuration's rounds would take more than 60 s (the padded baselines at max length 512
on a 2-core CPU), and W2 on 1500 texts with 3 timed runs; W3 (quick or not): 5 warm-up calls, then the median of
30 calls. Systems are timed in interleaved rounds (timing.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch

from . import baselines as bl
from . import machine, report
from .timing import RunPolicy, time_interleaved
from .w3 import W3_BATCHES, W3_LENGTHS, W3_MODELS, W3_REGIMES, W3_SYSTEMS, run_w3, w3_grid
from .workloads import (LONG_SHAPE, MODEL_SHAPES, Shape, attention_flops, build_hf_model, encoder_flops,
                        make_w1_case, position_limit, w1_grid, w1_long_grid)

W1_SYSTEMS = ("padfree", "padfree-fp32", "hf-eager", "hf-sdpa", "hf-sdpa-compile", "ort", "openvino", "torch-varlen")
LONG_SYSTEMS = ("padfree", "hf-sdpa", "openvino")  # eager (S x S in Python ops) and ORT's BERT graph do not fit
WORKLOADS = ("w1", "w1-long", "w2", "w3")
# workloads that run alone, each with its own options, in its own processes: --workload NAME -> module whose
# main(argv) takes the other arguments
STANDALONE = {"coldstart": "coldstart", "serve": "serve", "job": "job"}
QUICK_POLICY = RunPolicy(runs=5, min_runs=3, budget_s=60.0)
FULL_POLICY = RunPolicy(runs=10, min_runs=5, budget_s=600.0)
QUICK_W2 = (1500, RunPolicy(runs=3, min_runs=3))
FULL_W2 = (6000, RunPolicy(runs=5, min_runs=5))
LONG_POLICY = RunPolicy(runs=3, min_runs=3)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="padfree bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 16, max length 64/128/256/512, fewer runs, W2 on 1500 texts")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", help="comma list of fp32,bf16,fp16,int8 (default: fp32,bf16 on CPU; fp16,bf16 on GPU); "
                   "int8: each system in its own int8 form, beside padfree fp32, with each one's cosine to fp32")
    p.add_argument("--workload", default="w1,w2", help="comma list of w1,w1-long,w2,w3 (default w1,w2); coldstart, serve "
                   "and job run alone, each with its own options (padfree bench --workload job --help)")
    p.add_argument("--model-shape", help=f"W1 and W1-long model shapes, comma list of {','.join(MODEL_SHAPES)} "
                   f"(default: bert-base for W1, {LONG_SHAPE} for W1-long)")
    p.add_argument("--systems", help="W1, W1-long and W3 systems to run (default all that can; W1-long: "
                   f"{','.join(LONG_SYSTEMS)})")
    p.add_argument("--no-mha", action="store_true", help="skip the MHA-only comparison")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="the torch.compile baseline: auto = GPU, and CPU outside --quick (compiling takes ~45 s on 2 cores)")
    p.add_argument("--batch", help="override the W1 and W1-long batch sizes (comma list)")
    p.add_argument("--max-len", help="override the W1 and W1-long max lengths (comma list)")
    p.add_argument("--w2-texts", type=int, help="number of corpus texts for W2")
    p.add_argument("--w3-models", default=",".join(W3_MODELS), help=f"W3 models, comma list of {','.join(W3_MODELS)}")
    p.add_argument("--w3-batch", help=f"override the W3 batch sizes (default {','.join(map(str, W3_BATCHES))})")
    p.add_argument("--w3-len", help=f"override the W3 lengths (default {','.join(map(str, W3_LENGTHS))})")
    p.add_argument("--w3-calls", type=int, default=W3_REGIMES["back-to-back"].runs,
                   help="W3 timed calls per system and regime (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="intra-op threads of torch, ORT and OpenVINO (default: torch's)")
    p.add_argument("--json", help="write results as JSON ('{workload}' in the path: one file per workload)")
    p.add_argument("--markdown", help="write a Markdown report (same '{workload}' rule)")
    p.add_argument("--plot", help="write the W1 speedup plot (PNG)")
    args = p.parse_args(argv)
    args.workloads = _list(args.workload, WORKLOADS, "--workload")
    args.w3_model_list = _list(args.w3_models, W3_MODELS, "--w3-models")
    args.dtypes = _list(args.dtype or ("fp32,bf16" if args.device == "cpu" else "fp16,bf16"), tuple(bl.DTYPES), "--dtype")
    args.shapes = _list(args.model_shape or "bert-base", MODEL_SHAPES, "--model-shape")
    args.long_shapes = _list(args.model_shape, MODEL_SHAPES, "--model-shape") if args.model_shape else [LONG_SHAPE]
    args.long_systems = _list(args.systems, W1_SYSTEMS, "--systems") if args.systems else list(LONG_SYSTEMS)
    args.systems = _list(args.systems or ",".join(W1_SYSTEMS), W1_SYSTEMS, "--systems")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def _list(value: str, allowed, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {list(allowed)}")
    return items


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _builders(args, shape: str):
    compile_ok = args.compile == "on" or (args.compile == "auto" and (args.device != "cpu" or not args.quick))
    why = ("disabled by --compile off" if args.compile == "off" else
           "left out of --quick on CPU to keep it near 10 min (compiling takes ~45 s per dtype on 2 cores, then "
           "its timed runs); run without --quick or with --compile on")
    return {
        "padfree": lambda m, d: bl.build_padfree(m, d, args.device),
        "padfree-fp32": lambda m, d: bl.build_padfree_fp32(m, d, args.device),
        "hf-eager": lambda m, d: bl.build_hf_eager(m, d, args.device),
        "hf-sdpa": lambda m, d: bl.build_hf_sdpa(m, d, args.device),
        "hf-sdpa-compile": lambda m, d: bl.build_hf_sdpa_compiled(m, d, args.device, compile_ok, why),
        "ort": lambda m, d: bl.build_ort(m, d, args.device, shape, _log),
        "openvino": lambda m, d: bl.build_openvino(m, d, args.device, _log),
        "torch-varlen": lambda m, d: bl.build_torch_varlen(m, d, args.device),
    }


def _valid_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(a.device).bool()
    return float((a.float()[m] - b.float().to(a.device)[m]).abs().max())


def _cosines(out: torch.Tensor, fp32: torch.Tensor, mask: torch.Tensor) -> dict:
    """Cosine of each real token's output to padfree fp32's (min and mean): the int8 table's accuracy columns."""
    m = mask.bool()
    cos = torch.nn.functional.cosine_similarity(out.double()[m], fp32.double()[m], dim=-1)
    return {"cos_vs_fp32_min": cos.min().item(), "cos_vs_fp32_mean": cos.mean().item()}


def run_w1(args, peaks: dict, result: dict, long: bool = False) -> None:
    """W1, or with ``long`` W1-long (its shape, grid, systems and policy; batches padded to their longest)."""
    policy = LONG_POLICY if long else QUICK_POLICY if args.quick else FULL_POLICY
    grid = w1_long_grid() if long else w1_grid(args.quick)
    if args.batch or args.max_len:
        bs = [int(x) for x in args.batch.split(",")] if args.batch else sorted({b for b, _ in grid})
        ss = [int(x) for x in args.max_len.split(",")] if args.max_len else sorted({s for _, s in grid})
        grid = [(b, s) for s in ss for b in bs]
    max_len = max(s for _, s in grid)
    workload, systems = ("w1-long", args.long_systems) if long else ("w1", args.systems)
    for shape in (args.long_shapes if long else args.shapes):
        model = build_hf_model(shape, max_len, args.seed)
        limit = position_limit(model.config)
        fl_shape = Shape.of(model.config)
        for dname in args.dtypes:
            dtype = bl.DTYPES[dname]
            _log(f"W1 {shape} {dname}: building systems")
            runners, skipped = {}, {}
            for name, build in _builders(args, shape).items():
                if name not in systems or bl.ONLY_BESIDE.get(name, dname) != dname:
                    continue
                try:
                    runners[name] = build(model, dtype)
                except bl.Skip as e:
                    skipped[name] = str(e)
                    _log(f"  {name}: skipped: {e}")
            for batch, s in grid:
                if s > limit:
                    _log(f"{workload.upper()} {shape} b{batch} s{s}: beyond the model's {limit} positions, skipped")
                    continue
                case = make_w1_case(batch, s, model.config.vocab_size, args.seed, pad_to_longest=long)
                flops = encoder_flops(case.lengths, fl_shape)
                outputs = {}

                def call(name, fn):
                    def go():
                        outputs[name] = fn(case)
                    return go
                timings = time_interleaved({n: call(n, f) for n, f in runners.items()}, policy, args.device, _log)
                base = dict(workload=workload, model_shape=shape, dtype=dname, batch=batch, max_len=s,
                            tokens=case.tokens, padded_tokens=case.padded_tokens, flops=flops)
                t_pf = timings["padfree"].median_s if "padfree" in timings else None
                ref = outputs.get("hf-sdpa")
                fp32 = outputs.get("padfree-fp32")  # int8: each system's accuracy against fp32
                for name, tm in timings.items():
                    row = dict(base, system=name, status="ok" if tm.error is None else "skipped", reason=tm.error,
                               times_ms=[t * 1e3 for t in tm.times_s], warmup_s=tm.warmup_s)
                    if tm.median_s:
                        row.update(median_ms=tm.median_s * 1e3, tokens_per_s=case.tokens / tm.median_s,
                                   gflops=flops / tm.median_s / 1e9,
                                   pct_peak=100 * flops / tm.median_s / 1e9 / peaks[dname]["gflops"])
                        if name != "padfree" and t_pf:
                            row["speedup"] = tm.median_s / t_pf
                        if ref is not None and name in outputs and name != "hf-sdpa" and fp32 is None:
                            row["max_abs_diff_vs_hf_sdpa"] = _valid_max_diff(outputs[name], ref, case.attention_mask)
                        if fp32 is not None and name in outputs and name != "padfree-fp32":
                            row.update(_cosines(outputs[name], fp32, case.attention_mask))
                    result["w1"].append(row)
                for name, reason in skipped.items():
                    result["w1"].append(dict(base, system=name, status="skipped", reason=reason))
                _log(f"{workload.upper()} {shape} {dname} b{batch} s{s} T={case.tokens}: " + ", ".join(
                    f"{n} {t.median_s * 1e3:.0f}ms" for n, t in timings.items() if t.median_s))
            if not long and not args.no_mha and "padfree" in runners and dname != "int8":  # int8 attends in fp32
                run_mha(args, model, dname, runners["padfree"].encoder, grid, policy, peaks, result)
            del runners


def run_mha(args, model, dname, encoder, grid, policy, peaks, result) -> None:
    cfg = model.config
    dtype = bl.DTYPES[dname]
    for batch, s in grid:
        case = make_w1_case(batch, s, cfg.vocab_size, args.seed)
        inp = bl.mha_inputs(case, cfg.hidden_size, cfg.num_attention_heads, dtype, args.device, args.seed)
        systems = {"mha-padfree": bl.mha_padfree(encoder.kernels.varlen_attention),
                   "mha-padded-eager": bl.mha_padded_eager, "mha-padded-sdpa": bl.mha_padded_sdpa}
        timings = time_interleaved({n: (lambda f=f: f(inp)) for n, f in systems.items()}, policy, args.device, _log)
        flops = attention_flops(case.lengths, cfg.hidden_size)
        t_pf = timings["mha-padfree"].median_s
        for name, tm in timings.items():
            row = dict(workload="mha", dtype=dname, batch=batch, max_len=s, tokens=case.tokens, flops=flops,
                       system=name, status="ok" if tm.error is None else "skipped", reason=tm.error,
                       times_ms=[t * 1e3 for t in tm.times_s])
            if tm.median_s:
                row.update(median_ms=tm.median_s * 1e3, gflops=flops / tm.median_s / 1e9)
                if name != "mha-padfree" and t_pf:
                    row["speedup"] = tm.median_s / t_pf
            result["mha"].append(row)
        _log(f"MHA {dname} b{batch} s{s}: " + ", ".join(f"{n} {t.median_s * 1e3:.1f}ms"
                                                         for n, t in timings.items() if t.median_s))


def run_w3_workload(args, result: dict) -> None:
    grid = w3_grid([int(x) for x in args.w3_batch.split(",")] if args.w3_batch else W3_BATCHES,
                   [int(x) for x in args.w3_len.split(",")] if args.w3_len else W3_LENGTHS)
    builders = _builders(args, "bert-base")
    systems = [s for s in W3_SYSTEMS if s in args.systems]
    regimes = {name: dataclasses.replace(p, runs=args.w3_calls, min_runs=args.w3_calls)
               for name, p in W3_REGIMES.items()}
    result["w3"] = run_w3(args.w3_model_list, args.dtypes, builders, systems, args.seed, grid, regimes,
                          args.device, _log)


def _outputs(path: str | None, workloads: list[str]) -> dict[str, str]:
    """workload -> file; '{workload}' in the path splits per workload, else one file for all."""
    if not path:
        return {}
    if "{workload}" in path:
        return {w: path.format(workload=w) for w in workloads}
    return {"all": path}


def _subset(result: dict, workload: str) -> dict:
    parts = ("w1", "mha", "w2", "w2_corpus", "w3")
    keep = {"w1": ("w1", "mha"), "w1-long": ("w1",), "w2": ("w2", "w2_corpus"), "w3": ("w3",), "all": parts}[workload]
    out = {k: v for k, v in result.items() if k not in parts or k in keep}
    if workload in ("w1", "w1-long"):  # W1 and W1-long rows share the "w1" list, told apart by their workload
        out["w1"] = [r for r in result["w1"] if r.get("workload", "w1") == workload]
    return out


def standalone_workload(argv: list[str]) -> tuple[str | None, list[str]]:
    """Which workload that runs alone (:data:`STANDALONE`) ``--workload`` names, and the other arguments (its own
    options); ``(None, argv)`` for W1, W1-long, W2 and W3. The same ``--workload`` option as :func:`parse_args`'s,
    parsed by argparse (``--workload X``, ``--workload=X``, an abbreviation; the last one given counts)."""
    p = argparse.ArgumentParser(prog="padfree bench", add_help=False)  # --help: the chosen workload's parser
    p.add_argument("--workload", default="w1,w2")
    known, rest = p.parse_known_args(argv)
    names = [w.strip() for w in known.workload.split(",") if w.strip()]
    alone = [w for w in names if w in STANDALONE]
    if not alone:
        return None, argv
    if len(names) > 1:
        raise SystemExit(f"--workload {alone[0]} runs alone; run the other workloads in a separate command")
    return alone[0], rest


def main(argv: list[str]) -> dict:
    """``padfree bench ARGS``: ``argv`` is what follows ``bench`` on the command line (padfree/cli.py)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workload, rest = standalone_workload(argv)
    if workload is not None:
        import importlib
        return importlib.import_module(f".{STANDALONE[workload]}", __package__).main(rest)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.logging.set_verbosity_error()
    info = machine.machine_info(args.device)
    policy = QUICK_POLICY if args.quick else FULL_POLICY
    w2_texts, w2_policy = QUICK_W2 if args.quick else FULL_W2
    meta = {"machine": info, "machine_line": machine.describe(info), "versions": machine.versions(),
            "git_revision": machine.git_revision(), "date": machine.now_utc(),
            "command": "padfree bench " + " ".join(argv),
            "device": args.device, "dtypes": args.dtypes, "seed": args.seed, "quick": args.quick,
            "timing": (f"median of {policy.runs} timed runs after 1 warm-up (cut to >= {policy.min_runs} where a "
                       f"configuration's rounds pass {policy.budget_s:.0f} s), systems interleaved round by round; "
                       f"W2: {w2_policy.runs} timed runs; W3: median of {args.w3_calls} calls per regime after "
                       f"{W3_REGIMES['back-to-back'].warmup} warm-up calls (back-to-back: blocks of "
                       f"{W3_REGIMES['back-to-back'].block}, each after "
                       f"{W3_REGIMES['back-to-back'].settle_s * 1e3:.0f} ms of untimed calls; idle: "
                       f"{W3_REGIMES['idle'].idle_s * 1e3:.0f} ms of sleep "
                       f"before each call); W1-long: median of {LONG_POLICY.runs} timed runs after "
                       f"{LONG_POLICY.warmup} warm-up")}
    _log(f"padfree bench on {meta['machine_line']}; git {meta['git_revision']}")
    result = {"meta": meta, "peaks": {}, "w1": [], "mha": [], "w2": [], "w2_corpus": {}, "w3": []}
    t0 = time.perf_counter()
    for d in (args.dtypes if {"w1", "w1-long", "w2"} & set(args.workloads) else []):  # W3 reports no GFLOP/s
        result["peaks"][d] = machine.matmul_peak(bl.DTYPES[d], args.device)
        _log(f"matmul peak {d}: {result['peaks'][d]['gflops']:.0f} GFLOP/s {result['peaks'][d]['gflops_by_path']}")
    if "w1" in args.workloads:
        run_w1(args, result["peaks"], result)
    if "w1-long" in args.workloads:
        run_w1(args, result["peaks"], result, long=True)
    if "w2" in args.workloads:
        from .corpus import stdlib_paragraphs
        from .w2 import run_w2
        texts = stdlib_paragraphs(limit=args.w2_texts or w2_texts)
        result["w2"], result["w2_corpus"] = run_w2(texts, args.dtypes, args.device, w2_policy, log=_log)
    if "w3" in args.workloads:
        run_w3_workload(args, result)
    meta["elapsed_s"] = time.perf_counter() - t0
    for w, path in _outputs(args.json, args.workloads).items():
        report.write_json(_subset(result, w), path)
        _log(f"wrote {path}")
    for w, path in _outputs(args.markdown, args.workloads).items():
        report.write_markdown(_subset(result, w), path)
        _log(f"wrote {path}")
    if args.plot and report.write_plot(result, args.plot):
        _log(f"wrote {args.plot}")
    print(report.markdown(result))
    _log(f"done in {meta['elapsed_s']:.0f} s")
    return result
