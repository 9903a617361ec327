"""``padfree bench --workload serve`` (W4): embedding servers over HTTP under a closed-loop load.

Servers, each a separate process on 127.0.0.1 with all-MiniLM-L6-v2 on CPU, only one alive at a time:

- ``padfree-fp32`` / ``padfree-bf16``: ``padfree serve --model NAME=PATH --dtype fp32|bf16`` (``/v1/embeddings``);
- ``infinity``: Infinity (``infinity-emb`` 0.0.78, torch engine, fp32, its defaults otherwise) from its own
  virtual environment (``infinity_env.py``: its pins conflict with ours), ``/embeddings``;
- ``st``: sentence-transformers ``encode`` behind FastAPI, the server a user would write (``st_server.py``).

For each concurrency C (1, 8, 32, 128) every server is started in turn (the order reversed at every other level,
so a drift of the shared machine does not favour one), health-checked, warmed up, then loaded by a client
process (``loadgen.py``: one aiohttp session, C keep-alive connections, closed loop, one asyncio process that
shares the machine's cores with the server, as a real client would; it costs every server alike: OpenAI's body
with ``encoding_format: "base64"``, the JSON parsed and each vector decoded and checked). Requests carry 1-16 texts
drawn from the W2 corpus (Python standard library docstring paragraphs) by a fixed seed: the same sequence of
requests for every server. A run stops at ``--requests`` requests or ``--duration`` seconds, whichever first.

Reported per server and C: texts/s and tokens/s over the measured window (first send to last answer; tokens
counted with the model's tokenizer, truncated as the model truncates, special tokens included), p50/p95/p99 of
the request latency, errors, and the smallest cosine similarity of the vectors answered to the first ``--verify``
requests against sentence-transformers fp32 computed offline; and padfree's speedups over Infinity and the
plain server at each C, with the issue's targets.

    padfree bench --workload serve --json 'benchmarks/results/cpu-xeon-2c-{workload}.json' \\
        --markdown 'benchmarks/results/cpu-xeon-2c-{workload}.md'
    padfree bench --workload serve --quick --systems st,infinity --concurrency 1,8
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SYSTEMS = ("padfree-fp32", "padfree-bf16", "infinity", "st")
PEERS = ("infinity", "st")
CONCURRENCY = (1, 8, 32, 128)
MODEL_NAME = "all-MiniLM-L6-v2"
TARGETS = {"padfree-fp32": 1.6, "padfree-bf16": 2.5}  # throughput over each fp32 peer at concurrency >= 8
BF16_MIN_COSINE = 0.999
REPO = Path(__file__).resolve().parents[2]
LOADGEN = Path(__file__).resolve().with_name("loadgen.py")


@dataclass
class Policy:
    max_requests: int = 3000
    duration_s: float = 30.0
    warmup_requests: int = 32      # at least 2 x C
    warmup_s: float = 10.0
    request_timeout_s: float = 120.0
    verify: int = 64


FULL = Policy()
QUICK = Policy(max_requests=400, duration_s=10.0, warmup_requests=16, warmup_s=5.0)


@dataclass
class Server:
    system: str
    dtype: str
    argv: list[str]
    path: str
    env: dict = field(default_factory=dict)
    health: str = "/health"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(pythonpath: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def server_spec(system: str, model: str, port: int, name: str = MODEL_NAME, infinity_exe: str | None = None,
                max_batch_tokens: int | None = None) -> Server:
    if system.startswith("padfree-"):
        dtype = system.split("-", 1)[1]
        argv = [sys.executable, "-m", "padfree.cli", "serve", "--model", f"{name}={model}", "--host", "127.0.0.1",
                "--port", str(port), "--dtype", dtype, "--log-level", "warning",
                # the corpus has texts past the model's 256 tokens: cut them, as sentence-transformers and
                # Infinity do (padfree serve refuses them with 413 by default)
                "--auto-truncate"]
        if max_batch_tokens:
            argv += ["--max-batch-tokens", str(max_batch_tokens)]
        return Server(system, dtype, argv, "/v1/embeddings", _env(True))
    if system == "st":
        return Server(system, "fp32", [sys.executable, "-m", "padfree.bench.st_server", "--model", model, "--name",
                                       name, "--host", "127.0.0.1", "--port", str(port)], "/v1/embeddings", _env(True))
    if system == "infinity":
        if infinity_exe is None:
            raise ValueError("infinity needs its executable (infinity_env.ensure())")
        return Server(system, "fp32", [infinity_exe, "v2", "--model-id", model, "--served-model-name", name,
                                       "--engine", "torch", "--device", "cpu", "--dtype", "float32",
                                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                       "--no-model-warmup"],
                      "/embeddings", _env(False))
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


class Running:
    """A started server: ``port``, ``startup_s`` (spawn to first 200 from its health route); ``stop()`` ends its
    process group (the server and anything it spawned)."""

    def __init__(self, spec: Server, port: int, timeout_s: float = 300.0):
        self.spec, self.port = spec, port
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"padfree-serve-{spec.system}-", suffix=".log",
                                               delete=False)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(spec.argv, stdout=self.log, stderr=subprocess.STDOUT, env=spec.env,
                                     cwd=tempfile.gettempdir(), start_new_session=True)
        url = f"http://127.0.0.1:{port}{spec.health}"
        while True:
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                why = (f"exited with {self.proc.returncode}" if self.proc.poll() is not None else
                       f"did not answer within {timeout_s:.0f} s")
                tail = self.tail()
                self.stop()
                raise RuntimeError(f"{spec.system} {why} ({url}):\n{tail}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.2)
        self.startup_s = time.perf_counter() - t0

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self.log.close()
        os.unlink(self.log.name)


# ------------------------------------------------------------------------------------------------- workload
def make_requests(n_texts: int, count: int, seed: int, min_size: int = 1, max_size: int = 16) -> list[list[int]]:
    """``count`` requests, each ``min_size``..``max_size`` indices into the corpus, drawn uniformly with ``seed``."""
    rng = random.Random(seed)
    return [[rng.randrange(n_texts) for _ in range(rng.randint(min_size, max_size))] for _ in range(count)]


def load(running: Running, texts: list[str], warmup: list[list[int]], requests: list[list[int]], concurrency: int,
         policy: Policy, dim: int, name: str = MODEL_NAME) -> dict:
    """One closed-loop run against a started server, by a separate client process (loadgen.py)."""
    spec = {"host": "127.0.0.1", "port": running.port, "path": running.spec.path, "model": name,
            "concurrency": concurrency, "texts": texts, "warmup": warmup, "requests": requests,
            "max_requests": policy.max_requests, "time_limit_s": policy.duration_s,
            "warmup_time_limit_s": policy.warmup_s, "request_timeout_s": policy.request_timeout_s,
            "dim": dim, "keep": policy.verify}
    with tempfile.TemporaryDirectory(prefix="padfree-loadgen-") as d:
        spec_file, out_file = Path(d) / "spec.json", Path(d) / "out.json"
        spec_file.write_text(json.dumps(spec))
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        limit = policy.duration_s + policy.warmup_s + 2 * policy.request_timeout_s + 60
        proc = subprocess.run([sys.executable, str(LOADGEN), str(spec_file), str(out_file)], env=env,
                              capture_output=True, text=True, timeout=limit)
        if proc.returncode != 0:
            raise RuntimeError(f"load client failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out_file.read_text())


def decode(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f4")


def summarize(out: dict, requests: list[list[int]], tokens: list[int], reference: dict[int, np.ndarray]) -> dict:
    done = out["done"]
    ok = [(i, dt) for i, dt, good in done if good]
    lat = np.array([dt for _, dt in ok]) * 1e3
    n_texts = sum(len(requests[i]) for i, _ in ok)
    n_tokens = sum(tokens[t] for i, _ in ok for t in requests[i])
    s = out["seconds"]
    cos = []
    for i, vecs in out["kept"].items():
        for t, v in zip(requests[int(i)], vecs):
            a, b = decode(v).astype(np.float64), reference[t].astype(np.float64)
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    row = {"requests": len(ok), "errors": len(done) - len(ok), "error_messages": out["errors"],
           "texts": n_texts, "tokens": n_tokens, "seconds": s,
           "texts_per_s": n_texts / s if s else None, "tokens_per_s": n_tokens / s if s else None,
           "requests_per_s": len(ok) / s if s else None,
           "warmup_requests": out["warmup_done"], "warmup_errors": out["warmup_done"] - out["warmup_ok"],
           "verified_texts": len(cos), "min_cosine_vs_st_fp32": min(cos) if cos else None, "client_loop": out["loop"]}
    if len(lat):
        row.update(p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
                   p99_ms=float(np.percentile(lat, 99)), mean_ms=float(lat.mean()), max_ms=float(lat.max()))
    return row


def run_serve(systems: list[str], concurrencies: list[int], policy: Policy, model: str, seed: int = 0,
              corpus_texts: int = 4000, infinity_exe: str | None = None, max_batch_tokens: int | None = None,
              fresh_per_level: bool = True, texts: list[str] | None = None, log=_log) -> tuple[list[dict], dict]:
    """Rows (one per system and concurrency, or a skipped/failed row) and a description of the corpus.

    ``fresh_per_level``: at each concurrency every server is started in turn (order reversed at every other
    level), so the servers of one level are measured side by side; else each server is started once and
    runs every level. ``texts``: the corpus (default: ``corpus_texts`` W2 paragraphs)."""
    from sentence_transformers import SentenceTransformer

    from .corpus import stdlib_paragraphs

    source = "Python standard library docstring paragraphs (W2 corpus)" if texts is None else "given texts"
    texts = stdlib_paragraphs(limit=corpus_texts) if texts is None else list(texts)
    n_req = max(policy.max_requests, 1)
    requests = make_requests(len(texts), n_req, seed)
    warmups = {c: make_requests(len(texts), max(policy.warmup_requests, 2 * c), seed + 1) for c in concurrencies}
    st = SentenceTransformer(model, device="cpu")
    used = sorted({t for r in requests for t in r} | {t for w in warmups.values() for r in w for t in r})
    tokens = [0] * len(texts)
    for k in range(0, len(used), 256):
        chunk = used[k:k + 256]
        ids = st.tokenizer([texts[t] for t in chunk], truncation=True, max_length=st.max_seq_length)["input_ids"]
        for t, n in zip(chunk, ids):
            tokens[t] = len(n)
    verify_ids = sorted({t for r in requests[:policy.verify] for t in r})
    ref = st.encode([texts[t] for t in verify_ids], convert_to_numpy=True, batch_size=32)
    reference = dict(zip(verify_ids, ref))
    dim = int(ref.shape[1])
    del st
    sizes = [len(r) for r in requests]
    corpus = {"texts": len(texts), "source": source,
              "model": model, "dim": dim, "requests_drawn": len(requests), "seed": seed,
              "texts_per_request": f"uniform {min(sizes)}-{max(sizes)}, mean {np.mean(sizes):.1f}",
              "mean_tokens_per_text": float(np.mean([tokens[t] for r in requests for t in r])),
              "verified_texts": len(verify_ids)}
    log(f"serve: {len(texts)} corpus texts, {len(requests)} requests drawn (mean {np.mean(sizes):.1f} texts, "
        f"{corpus['mean_tokens_per_text']:.1f} tokens a text)")

    if fresh_per_level:
        sessions = [(system, [c]) for level, c in enumerate(concurrencies)
                    for system in (systems if level % 2 == 0 else systems[::-1])]
    else:
        sessions = [(system, list(concurrencies)) for system in systems]
    rows, broken = [], {}
    for system, levels in sessions:
        dtype = "bf16" if system == "padfree-bf16" else "fp32"
        if system in broken:
            rows += [{"workload": "serve", "system": system, "concurrency": c, "dtype": dtype, "status": "skipped",
                      "reason": broken[system]} for c in levels]
            continue
        running = None
        try:
            spec = server_spec(system, model, free_port(), infinity_exe=infinity_exe,
                               max_batch_tokens=max_batch_tokens)
            running = Running(spec, int(spec.argv[spec.argv.index("--port") + 1]))
        except Exception as e:  # noqa: BLE001 - a server that cannot start is a reported row, not a crash
            broken[system] = f"{type(e).__name__}: {e}"[:3000]  # the same would happen at every level
            log(f"serve {system}: cannot start: {broken[system][:1500]}")
            rows += [{"workload": "serve", "system": system, "concurrency": c, "dtype": dtype, "status": "failed",
                      "reason": broken[system]} for c in levels]
            continue
        try:
            for c in levels:
                base = {"workload": "serve", "system": system, "concurrency": c, "dtype": dtype}
                try:
                    out = load(running, texts, warmups[c], requests, c, policy, dim)
                    row = dict(base, status="ok", startup_s=running.startup_s, route=spec.path,
                               **summarize(out, requests, tokens, reference))
                    log(f"serve c={c} {system}: {row['texts_per_s']:.0f} texts/s, {row['tokens_per_s']:.0f} "
                        f"tokens/s, p50 {row.get('p50_ms', float('nan')):.1f} ms, p99 "
                        f"{row.get('p99_ms', float('nan')):.1f} ms, {row['requests']} requests in "
                        f"{row['seconds']:.1f} s, {row['errors']} errors, min cosine {row['min_cosine_vs_st_fp32']}")
                    if row["errors"]:
                        log(f"  first errors: {row['error_messages'][:3]}")
                except Exception as e:  # noqa: BLE001
                    row = dict(base, status="failed", reason=f"{type(e).__name__}: {e}"[:3000])
                    log(f"serve c={c} {system}: failed: {row['reason'][:1500]}")
                rows.append(row)
        finally:
            running.stop()
    rows.sort(key=lambda r: (concurrencies.index(r["concurrency"]), systems.index(r["system"])))
    return rows, corpus


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (VmRSS), MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_memory(system: str, model: str, texts: list[str], dim: int, requests: int, warmup: int, chunk: int,
               concurrency: int, seed: int, infinity_exe: str | None = None, max_batch_tokens: int | None = None,
               log=_log) -> dict:
    """Does a long-running server's memory level off? One server process: ``warmup`` varied requests (1-16
    texts of the corpus), then ``requests`` more in chunks of ``chunk``, at ``concurrency``; the server's RSS
    after the warm-up and after every chunk. ``growth_pct``: last sample over the one after warm-up."""
    spec = server_spec(system, model, free_port(), infinity_exe=infinity_exe, max_batch_tokens=max_batch_tokens)
    running = Running(spec, int(spec.argv[spec.argv.index("--port") + 1]))
    plan = make_requests(len(texts), warmup + requests, seed + 7)
    policy = Policy(max_requests=chunk, duration_s=3600.0, warmup_requests=0, warmup_s=0.0, verify=0)
    row = {"system": system, "dtype": "bf16" if system == "padfree-bf16" else "fp32", "concurrency": concurrency,
           "warmup_requests": warmup, "requests": requests, "chunk": chunk, "errors": 0, "samples": []}
    try:
        t0 = time.perf_counter()
        for start in range(0, warmup + requests, chunk):
            out = load(running, texts, [], plan[start:start + chunk], concurrency, policy, dim)
            row["errors"] += sum(1 for _, _, ok in out["done"] if not ok)
            done = start + len(out["done"])
            row["samples"].append({"requests": done, "rss_mb": rss_mb(running.proc.pid),
                                   "seconds": time.perf_counter() - t0})
            if done == warmup or (start < warmup < start + chunk):
                row["rss_after_warmup_mb"] = row["samples"][-1]["rss_mb"]
            log(f"serve memory {system}: {done} requests, RSS {row['samples'][-1]['rss_mb']:.0f} MiB")
    finally:
        running.stop()
    base = row.get("rss_after_warmup_mb") or row["samples"][0]["rss_mb"]
    row["rss_end_mb"] = row["samples"][-1]["rss_mb"]
    row["rss_max_after_warmup_mb"] = max(x["rss_mb"] for x in row["samples"] if x["requests"] >= warmup)
    row["growth_pct"] = 100.0 * (row["rss_end_mb"] - base) / base
    return row


def summary(rows: list[dict]) -> list[dict]:
    """Per concurrency: each padfree system's throughput over each peer (same run), p50 ratios, the targets."""
    at = {(r["system"], r["concurrency"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        for pf in ("padfree-fp32", "padfree-bf16"):
            p = at.get((pf, c))
            if p is None:
                continue
            for peer in PEERS:
                q = at.get((peer, c))
                if q is None or not q.get("texts_per_s") or not p.get("texts_per_s"):
                    continue
                s = {"concurrency": c, "system": pf, "peer": peer, "speedup": p["texts_per_s"] / q["texts_per_s"],
                     "p50_ratio": (q["p50_ms"] / p["p50_ms"]) if p.get("p50_ms") and q.get("p50_ms") else None}
                if c >= 8:
                    s["target_speedup"] = TARGETS[pf]
                    s["target_met"] = s["speedup"] >= TARGETS[pf]
                if c == 1 and s["p50_ratio"] is not None:
                    s["p50_no_worse"] = s["p50_ratio"] >= 1.0
                out.append(s)
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    c = result.get("serve_corpus", {})
    lines = ["# padfree bench — serve (W4: embedding servers over HTTP, all-MiniLM-L6-v2, CPU)", "",
             f"- machine: {m['machine_line']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- Infinity: {m.get('infinity') or 'not run'}",
             f"- git revision: `{m['git_revision']}`; date: {m['date']}",
             f"- command: `{m['command']}`",
             f"- method: {m['method']}"]
    if c:
        lines.append(f"- corpus: {c['texts']} texts ({c['source']}), requests of {c['texts_per_request']} texts "
                     f"(mean {c['mean_tokens_per_text']:.1f} tokens a text), seed {c['seed']}; cosine checked on "
                     f"the answers to the first requests of every run against sentence-transformers fp32 offline")
    lines += ["", "| C | system | dtype | texts/s | tokens/s | p50 ms | p95 ms | p99 ms | requests | errors | "
              "min cosine vs ST fp32 | startup s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, fmt="{:.1f}": "–" if x is None else fmt.format(x)  # noqa: E731
    for r in result.get("serve", []):
        if r.get("status") != "ok":
            lines.append(f"| {r['concurrency']} | {r['system']} | {r['dtype']} | {r['status']}: "
                         f"{r.get('reason', '')[:200]} | | | | | | | | |")
            continue
        lines.append(f"| {r['concurrency']} | {r['system']} | {r['dtype']} | {f(r['texts_per_s'], '{:.0f}')} | "
                     f"{f(r['tokens_per_s'], '{:.0f}')} | {f(r.get('p50_ms'))} | {f(r.get('p95_ms'))} | "
                     f"{f(r.get('p99_ms'))} | {r['requests']} | {r['errors']} | "
                     f"{f(r.get('min_cosine_vs_st_fp32'), '{:.6f}')} | {f(r.get('startup_s'))} |")
    s = result.get("serve_summary", [])
    if s:
        lines += ["", "padfree's throughput (texts/s) over each fp32 peer in the same run; p50 ratio = peer's p50 / "
                  "padfree's (above 1: padfree answers faster). Targets: ≥ 1.6× (fp32) and ≥ 2.5× (bf16) at C ≥ 8; "
                  "p50 at C = 1 no worse.", "",
                  "| C | padfree | over | speedup | target | p50 ratio |", "|---|---|---|---|---|---|"]
        for x in s:
            tgt = ("–" if "target_met" not in x else
                   f"{x['target_speedup']}× {'met' if x['target_met'] else '**missed**'}")
            if "p50_no_worse" in x:
                tgt = f"p50 {'no worse' if x['p50_no_worse'] else '**worse**'}"
            lines.append(f"| {x['concurrency']} | {x['system']} | {x['peer']} | **{x['speedup']:.2f}×** | {tgt} | "
                         f"{f(x['p50_ratio'], '{:.2f}')} |")
    for r in result.get("serve_memory", []):
        series = ", ".join(f"{x['requests']}: {x['rss_mb']:.0f}" for x in r["samples"])
        lines += ["", f"Memory, {r['system']} (one process, concurrency {r['concurrency']}): RSS after "
                      f"{r['warmup_requests']} warm-up requests {r['rss_after_warmup_mb']:.0f} MiB, after "
                      f"{r['requests']} more {r['rss_end_mb']:.0f} MiB (most {r['rss_max_after_warmup_mb']:.0f}): "
                      f"growth **{r['growth_pct']:+.1f}%** (target < 10%: "
                      f"{'met' if r['growth_pct'] < 10 else '**missed**'}), {r['errors']} errors. "
                      f"RSS MiB by requests done: {series}."]
    bf = [r["min_cosine_vs_st_fp32"] for r in result.get("serve", [])
          if r.get("system") == "padfree-bf16" and r.get("min_cosine_vs_st_fp32") is not None]
    if bf:
        lines += ["", f"padfree bf16: smallest cosine to sentence-transformers fp32 {min(bf):.6f} "
                      f"(target ≥ {BF16_MIN_COSINE}: {'met' if min(bf) >= BF16_MIN_COSINE else '**missed**'})."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- command
def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="padfree bench --workload serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"{QUICK.max_requests} requests or {QUICK.duration_s:.0f} s "
                   f"per server and concurrency (default {FULL.max_requests} or {FULL.duration_s:.0f} s)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma list (default 1,8,32,128)")
    p.add_argument("--requests", type=int, help="most measured requests per server and concurrency")
    p.add_argument("--duration", type=float, help="most seconds of measured load per server and concurrency")
    p.add_argument("--verify", type=int, help="cosine-check the answers to this many first requests of every run")
    p.add_argument("--corpus-texts", type=int, default=4000, help="corpus paragraphs to draw from (default 4000)")
    p.add_argument("--model", help="a sentence-transformers directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--max-batch-tokens", type=int, help="passed to padfree serve")
    p.add_argument("--infinity", help="the infinity_emb executable (default: build/find its venv, infinity_env.py)")
    p.add_argument("--one-start", action="store_true",
                   help="start each server once for all levels (default: a fresh start per server and level, the "
                        "servers of a level measured one after the other)")
    p.add_argument("--memory-requests", type=int,
                   help="after the levels, a memory run: this many varied requests after the warm-up against one "
                        "server process, its RSS sampled (default 2000; 0 with --quick)")
    p.add_argument("--memory-warmup", type=int, default=300, help="warm-up requests of the memory run (default 300)")
    p.add_argument("--memory-chunk", type=int, default=250, help="requests between RSS samples (default 250)")
    p.add_argument("--memory-concurrency", type=int, default=8)
    p.add_argument("--memory-systems", default="padfree-fp32", help="servers of the memory run (comma list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write results as JSON ('{workload}' in the path becomes 'serve')")
    p.add_argument("--markdown", help="write a Markdown report (same '{workload}' rule)")
    args = p.parse_args(argv)
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.system_list if s not in SYSTEMS]
    if bad or not args.system_list:
        raise SystemExit(f"--systems: unknown {bad}; choose from {list(SYSTEMS)}")
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.levels and min(args.levels) < 1:
        raise SystemExit("--concurrency: positive integers (or empty for the memory run alone)")
    if args.memory_requests is None:
        args.memory_requests = 0 if args.quick else 2000
    args.memory_system_list = [s.strip() for s in args.memory_systems.split(",") if s.strip()]
    bad = [s for s in args.memory_system_list if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"--memory-systems: unknown {bad}; choose from {list(SYSTEMS)}")
    return args


def main(argv: list[str]) -> dict:
    from dataclasses import replace

    from . import machine, report
    from .w2 import model_path
    args = parse_args(argv)
    policy = QUICK if args.quick else FULL
    policy = replace(policy, **{k: v for k, v in (("max_requests", args.requests), ("duration_s", args.duration),
                                                  ("verify", args.verify)) if v is not None})
    model = model_path(args.model)
    infinity = None
    if "infinity" in args.system_list:
        if args.infinity:
            infinity = args.infinity
        else:
            from . import infinity_env
            try:
                infinity = str(infinity_env.ensure(log=_log))
            except Exception as e:  # noqa: BLE001 - reported as skipped rows
                _log(f"infinity: cannot build its environment: {e}")
    info = machine.machine_info("cpu")
    meta = {"workload": "serve", "machine": info, "machine_line": machine.describe(info),
            "versions": machine.versions(), "git_revision": machine.git_revision(), "date": machine.now_utc(),
            "command": " ".join(["padfree bench --workload serve", *argv]), "model": model, "quick": args.quick,
            "policy": policy.__dict__, "systems": args.system_list, "concurrency": args.levels,
            "infinity": _infinity_versions(infinity) if infinity else None,
            "method": (f"closed loop, C client connections in one load-client process (aiohttp, HTTP/1.1 "
                       f"keep-alive, asyncio) that shares the machine's {info['cpu_cores']} cores with the server "
                       f"under test (its CPU use loads every server alike); "
                       + ("each server started once for every C (one alive at a time), " if args.one_start else
                          "per server and C: a fresh server process (one alive at a time, the servers of a C one "
                          "after the other, order reversed at every other C), ")
                       + f"{policy.warmup_requests}+ warm-up "
                       f"requests, then up to {policy.max_requests} requests or {policy.duration_s:.0f} s; "
                       f"OpenAI body with encoding_format base64, every vector decoded and checked")}
    t0 = time.perf_counter()
    _log(f"padfree bench --workload serve on {meta['machine_line']}; git {meta['git_revision']}")
    rows, corpus = run_serve(args.system_list, args.levels, policy, model, args.seed, args.corpus_texts,
                             infinity_exe=infinity, max_batch_tokens=args.max_batch_tokens,
                             fresh_per_level=not args.one_start) if args.levels else ([], {})
    memory = []
    if args.memory_requests:
        from .corpus import stdlib_paragraphs
        texts = stdlib_paragraphs(limit=args.corpus_texts)
        dim = corpus.get("dim") or _dimension(model)
        for system in args.memory_system_list:
            memory.append(run_memory(system, model, texts, dim, args.memory_requests,
                                     args.memory_warmup, args.memory_chunk, args.memory_concurrency, args.seed,
                                     infinity_exe=infinity, max_batch_tokens=args.max_batch_tokens))
    if "infinity" in args.system_list and infinity is None:
        rows += [{"workload": "serve", "system": "infinity", "concurrency": c, "dtype": "fp32", "status": "skipped",
                  "reason": "its virtual environment could not be built (see the log)"} for c in args.levels]
    meta["elapsed_s"] = time.perf_counter() - t0
    result = {"meta": meta, "schema": "padfree-bench/1", "serve": rows, "serve_corpus": corpus,
              "serve_summary": summary(rows), "serve_memory": memory}
    report.write_outputs(result, "serve", args.json, args.markdown, markdown(result), log=_log)
    print(markdown(result))
    return result


def _dimension(model: str) -> int:
    from ..sentence import SentenceEncoder
    return SentenceEncoder.from_pretrained(model).dimension


def _infinity_versions(exe: str) -> str:
    py = Path(exe).with_name("python")
    code = ("import importlib.metadata as m; print(', '.join(f'{p} {m.version(p)}' for p in "
            "('infinity_emb', 'torch', 'transformers', 'sentence-transformers', 'numpy')))")
    try:
        return subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60,
                              env=_env(False)).stdout.strip() or exe
    except (OSError, subprocess.SubprocessError):
        return exe
