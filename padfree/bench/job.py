"""``padfree bench --workload job`` (W5): a whole corpus from Parquet to Parquet, end to end.

The W2 corpus (Python standard library docstring paragraphs), repeated to at least :data:`MIN_ROWS` rows as the
protocol asks (docs/benchmarks.md, W5), with an int id per row, is written to one Parquet file;
each system is a fresh process that reads it, embeds every text with all-MiniLM-L6-v2 and writes the ids and
embeddings to Parquet:

- ``padfree-fp32`` / ``padfree-bf16``: ``padfree embed IN OUT --id-column id --dtype D --no-progress``;
- ``padfree-ray-fp32``: the same command with ``--ray=auto --ray-actors <cores> --ray-actor-cpus 1 --shard-rows
  RAY_SHARD_ROWS``, on a one-node Ray cluster (``ray start --head``) started before the timer and stopped after
  it, as a job meets a cluster that is already up. One single-threaded actor per core: with one actor holding both
  cores, each time Ray's own processes preempt one of torch's two threads the other waits at the next barrier
  (measured ~10% slower, benchmarks/NOTES.md section 14); shards of RAY_SHARD_ROWS rows keep the actors evenly
  busy to the end;
- ``script``: the script a user would write (:data:`SCRIPT`): pyarrow read, sentence-transformers ``encode``
  (batch 32, fp32), pyarrow write.

Timed: wall time of the process, start to exit (imports, model load, read, tokenize, encode, write), systems
interleaved run by run, median of the runs. Reported: rows/s, padfree's speedup over the script, and the
smallest cosine between each output and the script's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SYSTEMS = ("padfree-fp32", "padfree-bf16", "padfree-ray-fp32", "script")
TARGETS = {"padfree-fp32": 1.8, "padfree-bf16": 3.0}
MIN_ROWS = 20000  # the protocol's corpus size: the W2 corpus repeated to at least this many rows
RAY_WITHIN = 0.15  # the Ray Data job's rows/s within 15% of the local job's (fp32)
RAY_SHARD_ROWS = 2000  # rows per actor call in the Ray job

SCRIPT = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from sentence_transformers import SentenceTransformer
src, out, model = sys.argv[1:4]
table = pq.read_table(src, columns=["id", "text"])
st = SentenceTransformer(model, device="cpu")
emb = st.encode(table.column("text").to_pylist(), batch_size=32, convert_to_numpy=True)
vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
pq.write_table(pa.table({"id": table.column("id"), "embedding": vectors}), out)
"""


def _command(system: str, src: Path, out: Path, model: str) -> list[str]:
    if system == "script":
        return [sys.executable, "-c", SCRIPT, str(src), str(out / "out.parquet"), model]
    dtype = system.rsplit("-", 1)[1]
    cmd = [sys.executable, "-m", "padfree.cli", "embed", str(src), str(out), "--id-column", "id", "--model", model,
           "--dtype", dtype, "--no-progress"]
    if "-ray-" in system:
        cmd += ["--ray=auto", "--ray-actors", str(_cores()), "--ray-actor-cpus", "1", "--shard-rows",
                str(RAY_SHARD_ROWS)]
    return cmd


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _ray(*args: str) -> None:
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.run([str(ray), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def _read(out: Path) -> np.ndarray:
    import pyarrow.parquet as pq
    t = pq.read_table(out).sort_by("id")  # a Ray job's files are not always in input order
    return np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)


def run_job_workload(n_texts: int | None, runs: int, model: str, systems=SYSTEMS, log=print) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .corpus import stdlib_paragraphs
    from .w2 import min_cosine

    texts = stdlib_paragraphs(limit=n_texts)
    copies = 1 if n_texts else -(-MIN_ROWS // len(texts))
    texts = texts * copies
    rows = []
    with tempfile.TemporaryDirectory(prefix="padfree-job-") as d:
        d = Path(d)
        src = d / "corpus.parquet"
        pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), src)
        times: dict[str, list[float]] = {s: [] for s in systems}
        outputs: dict[str, np.ndarray] = {}
        lines: dict[str, list[str]] = {}
        env = dict(os.environ, HF_HUB_OFFLINE="1")  # tokenizers as users run them (their own thread pool)
        for r in range(runs):
            for system in (systems if r % 2 == 0 else systems[::-1]):
                out = d / f"{system}-{r}"
                out.mkdir()
                if "-ray-" in system:
                    _ray("start", "--head", f"--num-cpus={_cores()}", "--include-dashboard=false",
                         "--disable-usage-stats")
                try:
                    t0 = time.perf_counter()
                    proc = subprocess.run(_command(system, src, out, model), env=env, capture_output=True, text=True)
                    dt = time.perf_counter() - t0
                finally:
                    if "-ray-" in system:
                        _ray("stop", "--force")
                if proc.returncode != 0:
                    raise RuntimeError(f"{system} failed:\n{proc.stderr[-3000:]}")
                times[system].append(dt)
                said = [x for x in proc.stderr.splitlines() if x.startswith("padfree embed")]
                lines.setdefault(system, []).append(said[-1] if said else "")  # the job's own summary line
                outputs[system] = _read(out)
                log(f"job {system} run {r + 1}/{runs}: {dt:.1f} s, {len(texts) / dt:.1f} rows/s")
        ref = outputs.get("script")
        for system in systems:
            med = statistics.median(times[system])
            row = {"system": system, "rows": len(texts), "runs_s": times[system], "median_s": med,
                   "rows_per_s": len(texts) / med, "summary_lines": lines.get(system, []),
                   "min_cosine_vs_script": None if ref is None else min_cosine(outputs[system], ref)}
            rows.append(row)
    by = {r["system"]: r for r in rows}
    summary = []
    if "script" in by:
        for system, target in TARGETS.items():
            if system in by:
                s = by[system]["rows_per_s"] / by["script"]["rows_per_s"]
                summary.append({"system": system, "speedup_vs_script": s, "target": target, "met": s >= target})
    if "padfree-ray-fp32" in by and "padfree-fp32" in by:
        s = by["padfree-ray-fp32"]["rows_per_s"] / by["padfree-fp32"]["rows_per_s"]
        summary.append({"system": "padfree-ray-fp32", "vs_local": s, "target": 1 - RAY_WITHIN,
                        "met": s >= 1 - RAY_WITHIN})
    return {"job": rows, "job_summary": summary,
            "job_corpus": {"texts": len(texts), "copies": copies,
                           "source": "Python standard library docstring paragraphs (W2)"}}


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = ["# padfree bench — job (W5: Parquet to Parquet, all-MiniLM-L6-v2, CPU)", "",
             f"- machine: {m['machine_line']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- git revision: `{m['git_revision']}`; date: {m['date']}", f"- command: `{m['command']}`",
             f"- method: {m['method']}", "",
             "| system | rows | median s | rows/s | min cosine vs script | runs s |", "|---|---|---|---|---|---|"]
    for r in result["job"]:
        cos = "–" if r["min_cosine_vs_script"] is None else f"{r['min_cosine_vs_script']:.6f}"
        lines.append(f"| {r['system']} | {r['rows']} | {r['median_s']:.1f} | {r['rows_per_s']:.1f} | {cos} | "
                     f"{', '.join(f'{x:.1f}' for x in r['runs_s'])} |")
    if result["job_summary"]:
        lines += ["", "| padfree | speedup over the script (fp32) | target |", "|---|---|---|"]
        for s in result["job_summary"]:
            if "vs_local" in s:
                lines.append(f"| {s['system']} (Ray Data, vs the local job fp32) | **{s['vs_local']:.2f}×** | "
                             f"≥ {s['target']:.2f}× {'met' if s['met'] else '**missed**'} |")
                continue
            lines.append(f"| {s['system']} | **{s['speedup_vs_script']:.2f}×** | ≥ {s['target']}× "
                         f"{'met' if s['met'] else '**missed**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    from . import machine, report
    from .w2 import model_path
    p = argparse.ArgumentParser(prog="padfree bench --workload job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"1500 texts, 1 run (default: the W2 corpus repeated to >= {MIN_ROWS} rows, 3 runs)")
    p.add_argument("--texts", type=int)
    p.add_argument("--runs", type=int)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--model", help="a sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"--systems: unknown {bad}; choose from {list(SYSTEMS)}")
    n = args.texts or (1500 if args.quick else None)
    runs = args.runs or (1 if args.quick else 3)
    model = model_path(args.model)
    info = machine.machine_info("cpu")
    t0 = time.perf_counter()
    result = run_job_workload(n, runs, model, systems,
                              log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True))
    result["meta"] = {"workload": "job", "machine": info, "machine_line": machine.describe(info),
                      "versions": machine.versions(), "git_revision": machine.git_revision(),
                      "date": machine.now_utc(), "model": model,
                      "command": " ".join(["padfree bench --workload job", *argv]),
                      "elapsed_s": time.perf_counter() - t0,
                      "method": (f"wall time of a fresh process per system and run (imports, model load, read, "
                                 f"encode, write), {runs} run(s) each, systems interleaved (order reversed every "
                                 f"other run), median")}
    report.write_outputs(result, "job", args.json, args.markdown, markdown(result))
    print(markdown(result))
    return result
