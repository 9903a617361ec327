"""Side-by-side timing: every system of one configuration is timed in interleaved rounds.

A shared, noisy machine slows whatever runs while a colleague's job runs; interleaving (round r times system A,
then B, then C, ...) spreads that noise over all systems alike, so the ratios hold even when absolute times
move. Each system first runs once untimed (warm-up: oneDNN primitive creation, ORT session set-up, compilation;
its time is kept and reported as ``warmup_s``). GPU times use CUDA events after a synchronisation.

At millisecond scale a call is also slowed by the system that ran just before it: its worker threads are still
spinning (OpenMP, TBB) or the caller's own are asleep, and it takes a system several calls to get back to its own
pace (on the 2-core VM, OpenVINO after padfree at batch 1: 2.5x its steady time on the first call, still 10% over
after 80 ms of calls; benchmarks/NOTES.md, section 16). Two policies measure each system in a defined state instead
of after a foreign one: ``block`` (consecutive calls per system and round, after untimed calls for ``settle_s``: the
back-to-back latency of a busy server running that system alone) and ``idle_s`` (a pause before each timed call,
long enough for every thread pool to fall asleep: the latency of a request that arrives at an idle server).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class RunPolicy:
    """How many timed runs: ``runs`` per system, cut to no fewer than ``min_runs`` once the timed rounds of a
    configuration would pass ``budget_s`` (the expensive padded baselines at long lengths in ``--quick``).
    ``warmup`` untimed calls per system come first (the first one's time is kept as ``warmup_s``).
    ``block``: timed calls per system in a row within a round, preceded by untimed calls for at least
    ``settle_s`` seconds, and at least one (``block`` 1: one call, none untimed); ``idle_s``: seconds of sleep
    before each timed call (module docstring)."""
    runs: int = 5
    min_runs: int = 3
    budget_s: float = float("inf")
    warmup: int = 1
    block: int = 1
    settle_s: float = 0.0
    idle_s: float = 0.0


@dataclass
class Timing:
    times_s: list[float] = field(default_factory=list)
    warmup_s: float | None = None
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


class _Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch
            self.torch = torch

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def time_interleaved(systems: dict[str, Callable[[], object]], policy: RunPolicy, device: str = "cpu",
                     log: Callable[[str], None] = lambda s: None) -> dict[str, Timing]:
    """Warm each system up (``policy.warmup`` calls), then time them in rounds; a system that raises is recorded with its error
    and left out of later rounds (never silently dropped)."""
    timer = _Timer(device)
    out = {name: Timing() for name in systems}
    live = {}
    for name, fn in systems.items():
        try:
            out[name].warmup_s = timer(fn)
            for _ in range(policy.warmup - 1):
                fn()
            live[name] = fn
        except Exception as e:  # noqa: BLE001 - the reason is the result
            out[name].error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"  {name}: failed: {out[name].error}")
    spent, done = 0.0, 0
    while done < policy.runs:
        t_round = time.perf_counter()
        n = min(policy.block, policy.runs - done)
        for name, fn in live.items():
            if policy.block > 1:  # follows another system: untimed calls until it runs at its own pace
                settled = time.perf_counter() + policy.settle_s
                fn()
                while time.perf_counter() < settled:
                    fn()
            for _ in range(n):
                if policy.idle_s:
                    time.sleep(policy.idle_s)
                out[name].times_s.append(timer(fn))
        spent += time.perf_counter() - t_round
        done += n
        if done >= policy.min_runs and spent / done * (done + n) > policy.budget_s:
            break
    return out
