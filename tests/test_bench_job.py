"""The job workload's machinery (W5) on a few texts: padfree embed and the user's script run as processes on the
same Parquet corpus, and their outputs agree."""
from padfree.bench.job import markdown, run_job_workload
from padfree.bench.w2 import model_path


def test_job_workload_runs_both_systems_and_agrees():
    result = run_job_workload(40, 1, model_path(), systems=("padfree-fp32", "script"), log=lambda s: None)
    rows = {r["system"]: r for r in result["job"]}
    assert set(rows) == {"padfree-fp32", "script"} and all(r["rows"] == 40 for r in rows.values())
    assert rows["padfree-fp32"]["min_cosine_vs_script"] >= 0.99999
    assert result["job_summary"][0]["system"] == "padfree-fp32" and result["job_summary"][0]["speedup_vs_script"] > 0
    result["meta"] = {"machine_line": "m", "versions": {}, "git_revision": "r", "date": "d", "command": "c",
                      "method": "x"}
    assert "| padfree-fp32 | 40 |" in markdown(result)
