"""Writing results: JSON (everything), a Markdown table, and a PNG plot of padfree's speedup vs max length.

A result is one dict: ``meta`` (machine, versions, git revision, date, settings), ``peaks`` (measured matmul
GFLOP/s per dtype), ``w1``/``mha``/``w2``/``w3`` rows. Summaries (geometric means) are computed here from the rows,
so the numbers in the Markdown are always those of the JSON beside it.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

SCHEMA = "padfree-bench/1"


def geomean(xs) -> float | None:
    """``statistics.geometric_mean`` of the values present (None and 0 are rows without a figure)."""
    xs = [x for x in xs if x]
    return statistics.geometric_mean(xs) if xs else None


def w1_summary(result: dict) -> list[dict]:
    """Per (model shape, dtype, baseline): geometric-mean speedup of padfree over it across the W1 grid,
    and padfree's mean % of peak (all lengths, and max length >= 128)."""
    groups = defaultdict(list)
    for r in result.get("w1", []):
        if r["system"] != "padfree" and r.get("speedup"):
            groups[(r["model_shape"], r["dtype"], r["system"])].append(r["speedup"])
    out = [{"model_shape": s, "dtype": d, "baseline": b, "geomean_speedup": geomean(v), "configs": len(v)}
           for (s, d, b), v in groups.items()]
    return out


def padfree_peak_summary(result: dict) -> list[dict]:
    groups = defaultdict(list)
    for r in result.get("w1", []):
        if r["system"] == "padfree" and r.get("pct_peak") is not None:
            groups[(r["model_shape"], r["dtype"])].append(r)
    out = []
    for (s, d), rows in groups.items():
        long = [r["pct_peak"] for r in rows if r["max_len"] >= 128]
        out.append({"model_shape": s, "dtype": d, "min_pct_peak_maxlen_ge_128": min(long) if long else None,
                    "mean_pct_peak": sum(r["pct_peak"] for r in rows) / len(rows)})
    return out


def dtype_ratio_summary(result: dict, fast: str = "bf16", slow: str = "fp32") -> list[dict]:
    """padfree ``fast`` over padfree ``slow`` (e.g. bf16 over fp32), geometric mean over shared configs."""
    times = defaultdict(dict)
    for r in result.get("w1", []):
        if r["system"] == "padfree" and r.get("median_ms"):
            times[(r["model_shape"], r["batch"], r["max_len"])][r["dtype"]] = r["median_ms"]
    by_shape = defaultdict(list)
    for (shape, _, _), t in times.items():
        if fast in t and slow in t:
            by_shape[shape].append(t[slow] / t[fast])
    return [{"model_shape": s, "ratio": f"padfree {fast} over padfree {slow}", "geomean_speedup": geomean(v),
             "configs": len(v)} for s, v in by_shape.items()]


# -------------------------------------------------------------------------------------------------- JSON
def write_json(result: dict, path) -> None:
    result = dict(result, schema=SCHEMA, summary={"w1": w1_summary(result), "peak": padfree_peak_summary(result),
                                                  "dtype": dtype_ratio_summary(result), "w3": w3_summary(result)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- Markdown
def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _header(result: dict, title: str) -> list[str]:
    m = result["meta"]
    lines = [f"# {title}", "",
             f"- machine: {m['machine_line']}",
             f"- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             f"- git revision: `{m['git_revision']}`; date: {m['date']}",
             f"- command: `{m['command']}`",
             f"- timing: {m['timing']}"]
    peaks = result.get("peaks") or {}
    if peaks:
        lines.append("- measured matmul peak (best path, " + ", ".join(
            f"{d}: {p['gflops']:.0f} GFLOP/s" + (f" [{p['computed_as']}]" if "computed_as" in p else "")
            for d, p in peaks.items()) + "); per path: " + "; ".join(
            f"{d} " + ", ".join(f"{k} {v:.0f}" for k, v in p["gflops_by_path"].items()) for d, p in peaks.items()))
    return lines + [""]


def _cosine_cell(r: dict) -> str:
    return f"{_f(r.get('cos_vs_fp32_min'), '{:.4f}')} / {_f(r.get('cos_vs_fp32_mean'), '{:.5f}')}"


def w1_markdown(result: dict) -> str:
    rows = result.get("w1", [])
    if rows and all(r.get("workload") == "w1-long" for r in rows):
        lines = _header(result, "padfree bench — W1-long (long documents)")
        lines += ["Lengths uniform in [0.2 max, max]; the padded systems get each batch padded to its longest "
                  "sequence (a tokenizer's `padding=True`), padfree the valid tokens only. GFLOP/s and % peak count "
                  "valid tokens only, and a local (sliding-window) layer only the query-key pairs in its window.", ""]
    else:
        lines = _header(result, "padfree bench — W1 (ByteTransformer protocol)")
    keys = sorted({(r["model_shape"], r["dtype"]) for r in rows}, key=lambda k: (k[0], k[1] != "fp32", k[1]))
    summary = w1_summary(result)
    for shape, dtype in keys:
        sub = [r for r in rows if r["model_shape"] == shape and r["dtype"] == dtype]
        systems = list(dict.fromkeys(r["system"] for r in sub if r["status"] == "ok"))  # columns: what ran
        baselines = [s for s in systems if s != "padfree"]
        lines += [f"## {shape}, {dtype}", ""]
        accuracy = any("cos_vs_fp32_min" in r for r in sub)  # int8: each system's cosine to padfree fp32
        head = ["batch", "max len", "valid tokens", "padfree ms", "tokens/s", "GFLOP/s", "% peak"]
        head += ["padfree cos to fp32 (min / mean)"] if accuracy else []
        head += [f"{b} ms (padfree ×{'; cos min / mean' if accuracy and b != 'padfree-fp32' else ''})"
                 for b in baselines]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        configs = sorted({(r["batch"], r["max_len"]) for r in sub}, key=lambda c: (c[1], c[0]))
        for b, s in configs:
            at = {r["system"]: r for r in sub if r["batch"] == b and r["max_len"] == s}
            p = at.get("padfree", {})
            cells = [str(b), str(s), str(p.get("tokens", next(iter(at.values()))["tokens"])),
                     _f(p.get("median_ms"), "{:.1f}"), _f(p.get("tokens_per_s"), "{:.0f}"),
                     _f(p.get("gflops"), "{:.0f}"), _f(p.get("pct_peak"), "{:.0f}%")]
            if accuracy:
                cells.append(_cosine_cell(p))
            for base in baselines:
                r = at.get(base)
                if r is None or r["status"] != "ok":
                    cells.append("skipped")
                else:
                    cos = f"; {_cosine_cell(r)}" if accuracy and base != "padfree-fp32" else ""
                    cells.append(f"{r['median_ms']:.1f} ({_f(r.get('speedup'), '{:.2f}×')}{cos})")
            lines.append("| " + " | ".join(cells) + " |")
        gm = {s["baseline"]: s for s in summary if s["model_shape"] == shape and s["dtype"] == dtype}
        if gm:
            lines += ["", "Geometric-mean speedup of padfree: " + ", ".join(
                f"over {b} **{s['geomean_speedup']:.2f}×** ({s['configs']} configs)" for b, s in gm.items()) + "."]
        skipped = {r["system"]: r["reason"] for r in sub if r["status"] != "ok" and r["system"] not in systems}
        failed = [r for r in sub if r["status"] != "ok" and r["system"] in systems]
        for r in failed:
            lines.append(f"- failed: **{r['system']}** at batch {r['batch']}, max len {r['max_len']}: {r['reason']}")
        for system, reason in skipped.items():
            lines.append(f"- skipped: **{system}**: {reason}")
        extra = [r for r in sub if r.get("warmup_s") and r["system"].endswith("compile")]
        for r in extra[:1]:
            lines.append(f"- {r['system']}: first call (compilation) took {r['warmup_s']:.1f} s")
        lines.append("")
    for d in dtype_ratio_summary(result):
        if d["geomean_speedup"]:
            lines.append(f"- {d['model_shape']}: {d['ratio']}: **{d['geomean_speedup']:.2f}×** "
                         f"(geometric mean over {d['configs']} configs)")
    lines += ["", *mha_markdown(result)]
    return "\n".join(lines) + "\n"


def mha_markdown(result: dict) -> list[str]:
    rows = result.get("mha", [])
    if not rows:
        return []
    lines = ["## MHA only: padded PyTorch attention vs padfree varlen attention", "",
             "| dtype | batch | max len | padfree ms | GFLOP/s | padded eager ms (padfree ×) | padded sdpa ms (padfree ×) |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dtype"], r["batch"], r["max_len"]) for r in rows}, key=lambda k: (k[0] != "fp32", k[2], k[1]))
    for d, b, s in keys:
        at = {r["system"]: r for r in rows if (r["dtype"], r["batch"], r["max_len"]) == (d, b, s)}
        p = at.get("mha-padfree", {})
        cell = lambda n: (f"{at[n]['median_ms']:.2f} ({_f(at[n].get('speedup'), '{:.2f}×')})"  # noqa: E731
                          if n in at and at[n]["status"] == "ok" else "skipped")
        lines.append(f"| {d} | {b} | {s} | {_f(p.get('median_ms'))} | {_f(p.get('gflops'), '{:.0f}')} | "
                     f"{cell('mha-padded-eager')} | {cell('mha-padded-sdpa')} |")
    gm = defaultdict(list)
    for r in rows:
        if r.get("speedup"):
            gm[(r["dtype"], r["system"])].append(r["speedup"])
    lines += [""] + [f"- {d}: padfree over {s}: **{geomean(v):.2f}×** geometric mean" for (d, s), v in gm.items()]
    return lines + [""]


def w2_markdown(result: dict) -> str:
    lines = _header(result, "padfree bench — W2 (real corpus, all-MiniLM-L6-v2)")
    c = result.get("w2_corpus", {})
    if c:
        lines += [f"Corpus: {c['texts']} texts, {c['tokens']} tokens (mean {c['mean_tokens']:.1f}, median "
                  f"{c['p50_tokens']}, p99 {c['p99_tokens']}, max {c['max_tokens']}) — {c['source']}; "
                  f"model {c['model']}.", ""]
    lines += ["Columns 6-7 (padfree rows): padfree's speedup over sentence-transformers; column 8 (other rows): "
              "padfree's speedup over that system, same dtype. int8 rows: each system in its own int8 form "
              "(sentence-transformers with torch's dynamic int8 Linear), padfree fp32 beside them, and each one's "
              "embeddings against sentence-transformers fp32: the smallest cosine and the share of the 10 nearest "
              "texts of each of the first 100 that agree.", "",
              "| dtype | system | seconds | texts/s | tokens/s | padfree × ST (same dtype) | padfree × ST fp32 | "
              "padfree × this system | min cosine vs ST (same dtype) | min cosine vs ST fp32 | top-10 vs ST fp32 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("w2", []):
        system = r["system"] if r.get("precision") in (None, r["dtype"]) else f"{r['system']} ({r['precision']})"
        if r["status"] != "ok":
            lines.append(f"| {r['dtype']} | {system} | skipped: {r['reason']} | | | | | | | | |")
            continue
        lines.append(f"| {r['dtype']} | {system} | {r['median_s']:.2f} | {r['texts_per_s']:.0f} | "
                     f"{r['tokens_per_s']:.0f} | {_f(r.get('speedup_vs_st'), '{:.2f}×')} | "
                     f"{_f(r.get('speedup_vs_st_fp32'), '{:.2f}×')} | {_f(r.get('padfree_speedup'), '{:.2f}×')} | "
                     f"{_f(r.get('min_cosine_vs_st'), '{:.7f}')} | {_f(r.get('min_cosine_vs_st_fp32'), '{:.7f}')} | "
                     f"{_f(r.get('top10_vs_st_fp32'), '{:.3f}')} |")
    return "\n".join(lines) + "\n"


def w3_summary(result: dict) -> list[dict]:
    """Per (model, dtype, regime): padfree's ratio to the fastest peer, its geometric mean and its minimum over the
    configurations, and how many configurations padfree was at least as fast as every peer."""
    groups = defaultdict(list)
    for r in result.get("w3", []):
        if r["system"] == "padfree" and r.get("ratio_to_fastest_peer"):
            groups[(r["model"], r["dtype"], _regime(r))].append(r["ratio_to_fastest_peer"])
    return [{"model": m, "dtype": d, "regime": g, "geomean_ratio_to_fastest_peer": geomean(v),
             "min_ratio_to_fastest_peer": min(v), "configs": len(v),
             "configs_padfree_fastest": sum(x >= 1.0 for x in v)}
            for (m, d, g), v in groups.items()]


def _regime(row: dict) -> str:
    """A W3 row's timing regime (rows of results from before the regimes: one call per system in turn)."""
    return row.get("regime", "interleaved")


def w3_markdown(result: dict) -> str:
    lines = _header(result, "padfree bench — W3 (latency of small requests)")
    lines += ["Median ms per call (padded ids and mask in, last hidden state out). Last column: padfree's ratio to "
              "the fastest peer of the same precision, t(fastest peer) / t(padfree); above 1 padfree is faster. "
              "Regimes: **back-to-back**, each system timed in blocks of consecutive calls, each block after "
              "100 ms of untimed calls (a busy server running that system alone); "
              "**idle**, each call after 20 ms of sleep (a request reaching an idle server, its worker threads "
              "asleep).", ""]
    rows = result.get("w3", [])
    order = list(dict.fromkeys(_regime(r) for r in rows if "dtype" in r))
    keys = sorted({(r["model"], r["dtype"], _regime(r)) for r in rows if "dtype" in r},
                  key=lambda k: (k[0] != "minilm", k[0], k[1] != "fp32", k[1], order.index(k[2])))
    summary = {(s["model"], s["dtype"], s["regime"]): s for s in w3_summary(result)}
    for model, dtype, regime in keys:
        sub = [r for r in rows if r.get("model") == model and r.get("dtype") == dtype and _regime(r) == regime]
        systems = list(dict.fromkeys(r["system"] for r in sub if r["status"] == "ok"))
        peers = [s for s in systems if s != "padfree"]
        prec = {r["system"]: r.get("precision") for r in sub if r["status"] == "ok"}
        label = lambda s: s if prec.get(s) in (None, dtype) else f"{s} ({prec[s]})"  # noqa: E731
        lines += [f"## {model}, {dtype}, {regime}", ""]
        head = ["batch", "length", "lengths", "padfree ms"] + [f"{label(p)} ms" for p in peers]
        head += ["fastest peer", "padfree × fastest"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for b, n in sorted({(r["batch"], r["length"]) for r in sub}, key=lambda c: (c[0], c[1])):
            at = {r["system"]: r for r in sub if (r["batch"], r["length"]) == (b, n)}
            p = at.get("padfree", {})
            cells = [str(b), str(n), ",".join(map(str, next(iter(at.values()))["lengths"])),
                     _f(p.get("median_ms"), "{:.2f}")]
            cells += [_f(at[q].get("median_ms"), "{:.2f}") if q in at and at[q]["status"] == "ok" else "skipped"
                      for q in peers]
            ratio = p.get("ratio_to_fastest_peer")
            cells += [p.get("fastest_peer", "–"), "–" if ratio is None else
                      (f"**{ratio:.2f}×**" if ratio >= 1 else f"{ratio:.2f}×")]
            lines.append("| " + " | ".join(cells) + " |")
        s = summary.get((model, dtype, regime))
        if s:
            lines += ["", f"padfree × fastest peer: geometric mean **{s['geomean_ratio_to_fastest_peer']:.2f}×**, "
                          f"lowest {s['min_ratio_to_fastest_peer']:.2f}×; padfree at least as fast as every peer in "
                          f"{s['configs_padfree_fastest']} of {s['configs']} configurations."]
        for system, reason in {r["system"]: r["reason"] for r in sub
                               if r["status"] != "ok" and r["system"] not in systems}.items():
            lines.append(f"- skipped: **{system}**: {reason}")
        for r in sub:
            if r["status"] != "ok" and r["system"] in systems:
                lines.append(f"- failed: **{r['system']}** at batch {r['batch']}, length {r['length']}: {r['reason']}")
        lines.append("")
    for r in rows:
        if "dtype" not in r:
            lines.append(f"- skipped: model **{r['model']}**: {r['reason']}")
    cold = [r for r in rows if r.get("build_s") is not None]
    if cold:
        lines += ["## Cold start", "",
                  "Seconds to build each system from the loaded transformers model (OpenVINO converts once per model; "
                  "its second precision reuses the conversion), and its first call (first configuration, before "
                  "warm-up).", "", "| model | dtype | system | build s | first call ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['dtype']} | {r['system']} | {r['build_s']:.2f} | {r['first_call_ms']:.1f} |"
                  for r in cold]
        lines.append("")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    parts = []
    if result.get("w1"):
        parts.append(w1_markdown(result))
    if result.get("w2"):
        parts.append(w2_markdown(result))
    if result.get("w3"):
        parts.append(w3_markdown(result))
    return "\n".join(parts)


def write_markdown(result: dict, path, text: str | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text if text is not None else markdown(result))


def write_outputs(result: dict, workload: str, json_path: str | None, markdown_path: str | None, markdown_text: str,
                  log=print) -> None:
    """A workload's own result files (``{workload}`` in a path becomes its name): JSON as it is, and Markdown."""
    for path, text in ((json_path, json.dumps(result, indent=1, default=str) + "\n"), (markdown_path, markdown_text)):
        if path:
            path = Path(path.format(workload=workload))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            log(f"wrote {path}")


# ------------------------------------------------------------------------------------------------- plot
def write_plot(result: dict, path) -> bool:
    """Speedup of padfree over each baseline vs max length (largest batch of the run), one panel per model
    shape and dtype; a dashed line at 1×. False if there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.get("w1", []) if r.get("speedup")]
    if not rows:
        return False
    panels = sorted({(r["model_shape"], r["dtype"]) for r in rows}, key=lambda k: (k[0], k[1] != "fp32"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (shape, dtype) in zip(axes[0], panels):
        sub = [r for r in rows if r["model_shape"] == shape and r["dtype"] == dtype]
        batch = max(r["batch"] for r in sub)
        for system in dict.fromkeys(r["system"] for r in sub):
            pts = sorted((r["max_len"], r["speedup"]) for r in sub if r["system"] == system and r["batch"] == batch)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"over {system}")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        lens = sorted({r["max_len"] for r in sub})
        ax.set_xticks(lens)
        ax.set_xticklabels([str(x) for x in lens])
        ax.set_xlabel("max sequence length")
        ax.set_ylabel("padfree speedup (×)")
        ax.set_title(f"{shape}, {dtype}, batch {batch}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"padfree W1 speedup — {result['meta']['machine_line']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
