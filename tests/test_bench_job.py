"""The job workload's machinery (W5) on a few texts: padfree embed and the user's script run as processes on the
same Parquet corpus, and their outputs agree."""
import time

import pytest

from padfree.bench import job
from padfree.bench.job import markdown, run_job_workload
from padfree.bench.w2 import model_path


def test_job_workload_runs_both_systems_and_agrees(monkeypatch):
    processes = []  # (command, seconds) of each system's process, timed around the call itself
    real_run = job.subprocess.run

    def timed_run(cmd, *args, **kwargs):
        t0 = time.perf_counter()
        proc = real_run(cmd, *args, **kwargs)
        processes.append((cmd, time.perf_counter() - t0))
        return proc
    monkeypatch.setattr(job.subprocess, "run", timed_run)
    result = run_job_workload(40, 1, model_path(), systems=("padfree-fp32", "script"), log=lambda s: None)
    rows = {r["system"]: r for r in result["job"]}
    assert set(rows) == {"padfree-fp32", "script"} and all(r["rows"] == 40 for r in rows.values())
    assert rows["padfree-fp32"]["min_cosine_vs_script"] >= 0.99999
    # each run's time is its process's, start to exit: the call's own time and (50 ms for the clock reads) no more
    assert [cmd[2] for cmd, _ in processes] == ["padfree.cli", job.SCRIPT]  # run 1: in the systems' order
    for (_, seconds), system in zip(processes, ("padfree-fp32", "script")):
        r = rows[system]
        assert r["runs_s"] == [r["median_s"]] and seconds <= r["median_s"] <= seconds + 0.05, (system, seconds, r)
        assert r["rows_per_s"] == pytest.approx(40 / r["median_s"])
    (s,) = result["job_summary"]
    assert s["system"] == "padfree-fp32"
    assert s["speedup_vs_script"] == pytest.approx(rows["script"]["median_s"] / rows["padfree-fp32"]["median_s"])
    assert s["target"] == job.TARGETS["padfree-fp32"] and s["met"] == (s["speedup_vs_script"] >= s["target"])
    result["meta"] = {"machine_line": "m", "versions": {}, "git_revision": "r", "date": "d", "command": "c",
                      "method": "x"}
    assert "| padfree-fp32 | 40 |" in markdown(result)
