"""GPU check and benchmark of padfree's Triton kernels (run on a CUDA machine).

    python3 benchmarks/gpu_kernels.py OUT.json [--md OUT.md] [--tune] [--skip-tests]

(a) runs tests/test_triton_ops.py on the GPU (full sizes);
(b) times padfree's varlen attention against padded PyTorch attention (QK^T, masked softmax, .V on
    [B, heads, S, d]), padded F.scaled_dot_product_attention and torch.nn.attention.varlen.varlen_attn (packed),
    BERT-base shape (12 heads, head size 64), fp16 and bf16, batch 16, max lengths 64..1024, lengths uniform
    in [0.2 max, max] (fixed seed). Padded baselines pad to the batch's longest sequence and get their inputs
    already padded and biased (only the attention itself is timed); padfree's time includes the QKV bias.
(c) times the LayerNorm, bias+GELU and embedding kernels against the PyTorch backend, in GB/s over the
    fewest bytes each op must move (inputs read once, output written once);
(e) times attention with DeBERTa-v3's relative terms (c2p + p2c over 256 log buckets) and MPNet's bias:
    the Triton kernel against the torch backend (runs of equal lengths with an additive mask; what
    relative models used on GPUs before the kernel had them; eager, since it reads offsets on the host).
Timing: each contender's calls on N_SETS input sets (rotated, so that inputs are not found in L2 unless they
are small) are captured in one CUDA graph by ``triton.testing.do_bench_cudagraph``; median of its replays
divided by the calls per replay. This is GPU time without host launch overhead, the same for every contender.
padfree's attention is also timed eagerly from Python (``triton.testing.do_bench``: events around each call, L2
flushed before; median) to show what launching it costs. With --tune, (d) sweeps attention launch configurations first.
Prints Markdown tables last; writes every figure to the JSON path.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from padfree.ops import torch_backend  # noqa: E402
from padfree.ops.triton_activation import bias_act  # noqa: E402
from padfree.ops.triton_attention import (attention_config, launch_varlen_attention,  # noqa: E402
                                          varlen_attention)
from padfree.ops.triton_embedding import embed_layer_norm  # noqa: E402
from padfree.ops.triton_layer_norm import add_bias_residual_layer_norm  # noqa: E402

MAX_LENS = [64, 128, 256, 384, 512, 768, 1024]
BATCH, HEADS, HEAD_DIM = 16, 12, 64
N_SETS = 4  # input sets rotated through, so that consecutive calls do not find their inputs in L2


def bench_eager(fn, warmup_ms=25, rep_ms=100):
    """Median ms of ``fn()`` launched from Python: ``triton.testing.do_bench`` (CUDA events around each call,
    L2 flushed before each, enough calls to fill ``rep_ms``)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph(calls, rep_ms=20):
    """Median ms per call of the zero-argument ``calls`` (one per input set, run round-robin so that inputs are
    not found in L2 unless small): ``triton.testing.do_bench_cudagraph`` captures the round in a CUDA graph (no
    host launch overhead) and times its replays with CUDA events."""
    from triton.testing import do_bench_cudagraph

    def round_robin():
        for fn in calls:
            fn()
    return do_bench_cudagraph(round_robin, rep=rep_ms, return_mode="median") / len(calls)


def timed(calls):
    """Graph timing, or eager timing of the first call (with the reason) if the calls cannot be captured."""
    try:
        return bench_graph(calls), None
    except Exception as exc:  # noqa: BLE001
        torch.cuda.synchronize()
        return bench_eager(calls[0]), f"not capturable, eager timing: {exc!r}"[:200]


def lengths_for(max_len, seed=0):
    gen = torch.Generator().manual_seed(seed + max_len)
    return torch.randint(max(1, int(0.2 * max_len)), max_len + 1, (BATCH,), generator=gen).tolist()


def varlen_attn_fn():
    """torch.nn.attention.varlen.varlen_attn if this PyTorch has it, with its signature (for the log)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001
        return None, f"unavailable: {exc!r}"
    return varlen_attn, str(inspect.signature(varlen_attn))


def attention_inputs(lengths, dtype, seed, heads=HEADS, head_dim=HEAD_DIM):
    """Packed qkv and bias, plus the padded, biased q, k, v ``[B, heads, S, d]`` of the same data."""
    S, H, T = max(lengths), heads * head_dim, sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(T, 3 * H, device="cuda", dtype=dtype, generator=gen)
    bias = 0.1 * torch.randn(3 * H, device="cuda", dtype=dtype, generator=gen)
    pad_index = torch.cat([b * S + torch.arange(n) for b, n in enumerate(lengths)]).cuda()
    biased = (qkv + bias).view(T, 3, heads, head_dim)
    padded = torch.zeros(len(lengths) * S, 3, heads, head_dim, device="cuda", dtype=dtype)
    padded[pad_index] = biased
    q, k, v = padded.view(len(lengths), S, 3, heads, head_dim).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
    return dict(qkv=qkv, bias=bias, biased=biased, q=q, k=k, v=v, pad_index=pad_index)


def attention_case(max_len, dtype, varlen_attn):
    lengths = lengths_for(max_len)
    S = max(lengths)  # padded baselines pad to the batch's longest sequence
    H = HEADS * HEAD_DIM
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(HEAD_DIM)
    valid = torch.arange(S, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]  # [B, S]
    add_mask = torch.zeros(BATCH, 1, 1, S, device="cuda", dtype=dtype).masked_fill(~valid[:, None, None, :],
                                                                                   torch.finfo(dtype).min)
    bool_mask = valid[:, None, None, :]
    sets = [attention_inputs(lengths, dtype, seed=1000 * max_len + i) for i in range(N_SETS)]

    def ours(x):
        return lambda: varlen_attention(x["qkv"], cu, S, HEADS, x["bias"])

    def torch_padded(x):
        def fn():
            s = torch.matmul(x["q"], x["k"].transpose(-1, -2)) * scale + add_mask
            return torch.matmul(torch.softmax(s, dim=-1), x["v"])
        return fn

    def sdpa_padded(x):
        return lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=bool_mask)

    def varlen(x):
        qp, kp, vp = x["biased"].unbind(1)  # packed [T, heads, d] views, row stride 3H
        return lambda: varlen_attn(qp, kp, vp, cu, cu, S, S)

    res = dict(max_len=max_len, dtype=str(dtype).replace("torch.", ""), tokens=T, padded_tokens=BATCH * S,
               flop=4.0 * sum(n * n for n in lengths) * H, config=attention_config(S, HEAD_DIM, dtype))
    x0 = sets[0]
    out = ours(x0)()
    ref = torch_padded(x0)().transpose(1, 2).reshape(BATCH * S, H)[x0["pad_index"]]
    res["max_abs_diff_vs_padded"] = (out.float() - ref.float()).abs().max().item()
    res["padfree_ms"], res["padfree_note"] = timed([ours(x) for x in sets])
    res["padfree_eager_ms"] = bench_eager(ours(x0))
    res["torch_padded_ms"], res["torch_padded_note"] = timed([torch_padded(x) for x in sets])
    res["sdpa_padded_ms"], res["sdpa_padded_note"] = timed([sdpa_padded(x) for x in sets])
    if varlen_attn is not None:
        try:
            o = varlen(x0)()
            o = o[0] if isinstance(o, tuple) else o
            res["varlen_max_abs_diff"] = (o.reshape(T, H).float() - out.float()).abs().max().item()
            res["varlen_attn_ms"], res["varlen_attn_note"] = timed([varlen(x) for x in sets])
        except Exception as exc:  # noqa: BLE001
            res["varlen_attn_error"] = repr(exc)[:300]
    res["tflops"] = res["flop"] / res["padfree_ms"] / 1e9
    return res


def relative_scores(kind, S, dtype):
    """``(RelativeScores, scale)`` of layer 0 of a random-weight DeBERTa-v3-base (c2p + p2c over 256 log buckets)
    or MPNet-base (32-bucket bias), built by the model's own code for a batch of max length S."""
    import padfree
    from padfree.bench.workloads import build_hf_model
    enc = padfree.from_pretrained(build_hf_model({"deberta-v3": "deberta-v3-base", "mpnet": "mpnet-base"}[kind], S),
                                  dtype=dtype, device="cuda")
    layer = enc.layers[0]
    rel = enc.relative.for_batch(enc.config, S).scores(layer.qkv.weight, layer.qkv.bias, layer.pos_key,
                                                       layer.pos_query)
    return rel, enc.config.attention_scale


def relative_case(kind, max_len, dtype):
    lengths = lengths_for(max_len)
    S = max(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    sets = [attention_inputs(lengths, dtype, seed=2000 * max_len + i) for i in range(N_SETS)]
    rel, scale = relative_scores(kind, S, dtype)

    def ours(x):
        return lambda: varlen_attention(x["qkv"], cu, S, HEADS, x["bias"], scale, rel=rel)

    def fallback(x):
        return lambda: torch_backend.varlen_attention(x["qkv"], cu, S, HEADS, x["bias"], scale, rel=rel)

    res = dict(kind=kind, max_len=max_len, dtype=str(dtype).replace("torch.", ""), tokens=sum(lengths),
               table_rows=rel.index.max().item() + 1)
    x0 = sets[0]
    res["max_abs_diff_vs_torch"] = (ours(x0)().float() - fallback(x0)().float()).abs().max().item()
    res["padfree_ms"], res["padfree_note"] = timed([ours(x) for x in sets])
    res["padfree_eager_ms"] = bench_eager(ours(x0))
    res["torch_backend_ms"] = bench_eager(fallback(x0))
    return res


TUNE_LONG = [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 8, 3), (64, 128, 4, 3),
             (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]


def tune_attention(dtype, max_lens, head_dim=HEAD_DIM, heads=HEADS):
    """Time launch configurations of the attention kernel (graph timing); returns rows of (config, ms)."""
    rows = []
    for max_len in max_lens:
        lengths = lengths_for(max_len)
        S = max(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        sets = [attention_inputs(lengths, dtype, seed=i, heads=heads, head_dim=head_dim) for i in range(N_SETS)]
        cfgs = [dict(block_m=bm, block_n=bn, single_tile=False, num_warps=w, num_stages=st)
                for bm, bn, w, st in TUNE_LONG]
        if S <= 256:
            bn = max(16, 1 << (S - 1).bit_length())
            cfgs += [dict(block_m=bm, block_n=bn, single_tile=True, num_warps=w, num_stages=1)
                     for bm in (16, 32, 64, 128) if bm <= bn for w in (4, 8)]
        for cfg in cfgs:
            calls = [lambda x=x, cfg=cfg: launch_varlen_attention(x["qkv"], cu, S, heads, x["bias"], **cfg)
                     for x in sets]
            try:
                ms = bench_graph(calls)
            except Exception as exc:  # noqa: BLE001 (e.g. out of shared memory)
                torch.cuda.synchronize()
                ms, cfg = None, {**cfg, "error": repr(exc)[:120]}
            rows.append(dict(dtype=str(dtype).replace("torch.", ""), head_dim=head_dim, max_len=max_len, **cfg,
                             ms=ms))
    return rows


def memory_bound_cases(dtype):
    """Each op on several input sets in rotation (> 200 MB touched per round, 4x the L2), graph-timed."""
    rows = []
    es = torch.tensor([], dtype=dtype).element_size()
    name = str(dtype).replace("torch.", "")
    for T in (4915, 65536):  # ~ batch 16 x mean length 307 (max 512); a large batch
        H, Fdim = 768, 3072
        n_sets = max(2, math.ceil(200e6 / (3 * T * H * es)))
        w, lb = (torch.randn(H, device="cuda", dtype=dtype) for _ in range(2))
        sets = [dict(x=torch.randn(T, H, device="cuda", dtype=dtype), res=torch.randn(T, H, device="cuda", dtype=dtype),
                     b=torch.randn(H, device="cuda", dtype=dtype), h=torch.randn(T, Fdim, device="cuda", dtype=dtype),
                     hb=torch.randn(Fdim, device="cuda", dtype=dtype)) for _ in range(n_sets)]
        cases = [("add_bias_residual_layer_norm", [T, H], 3 * T * H * es,
                  lambda s: lambda: add_bias_residual_layer_norm(s["x"], s["b"], s["res"], w, lb, 1e-12),
                  lambda s: lambda: torch_backend.add_bias_residual_layer_norm(s["x"], s["b"], s["res"], w, lb, 1e-12))]
        for act in ("gelu", "gelu_tanh"):
            cases.append((f"bias_act[{act}]", [T, Fdim], 2 * T * Fdim * es,
                          lambda s, act=act: lambda: bias_act(s["h"], s["hb"], act),
                          lambda s, act=act: lambda: torch_backend.bias_act(s["h"], s["hb"], act)))
        word = torch.randn(30522, H, device="cuda", dtype=dtype)
        pos = torch.randn(512, H, device="cuda", dtype=dtype)
        typ = torch.randn(2, H, device="cuda", dtype=dtype)
        for s in sets:
            s["ids"] = (torch.randint(0, 30522, (T,), device="cuda"), torch.randint(0, 512, (T,), device="cuda"),
                        torch.randint(0, 2, (T,), device="cuda"))
        cases.append(("embed_layer_norm", [T, H], 4 * T * H * es + 3 * T * 8,
                      lambda s: lambda: embed_layer_norm(*s["ids"], word, pos, typ, w, lb, 1e-12),
                      lambda s: lambda: torch_backend.embed_layer_norm(*s["ids"], word, pos, typ, w, lb, 1e-12)))
        for op, shape, nbytes, ours, ref in cases:
            ours_ms, note1 = timed([ours(s) for s in sets])
            torch_ms, note2 = timed([ref(s) for s in sets])
            rows.append(dict(op=op, dtype=name, shape=shape, bytes=nbytes, padfree_ms=ours_ms, torch_ms=torch_ms,
                             notes=[n for n in (note1, note2) if n]))
        del sets
    for r in rows:
        r["padfree_gbs"] = r["bytes"] / r["padfree_ms"] / 1e6
        r["torch_gbs"] = r["bytes"] / r["torch_ms"] / 1e6
    return rows


def copy_bandwidth():
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_eager(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e6


def run_tests():
    t0 = time.time()
    cmd = [sys.executable, "-m", "pytest", "tests/test_triton_ops.py", "-q", "-p", "no:cacheprovider", "-W",
           "ignore::UserWarning", "-p", "no:benchmark"]
    try:
        import xdist  # noqa: F401
        cmd += ["-n", "8"]
    except ImportError:
        pass
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."))
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(lines[-40:]), flush=True)
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or " error" in ln), "")
    return dict(returncode=proc.returncode, summary=summary.strip("= "), seconds=round(time.time() - t0, 1),
                log_tail="\n".join(lines[-60:]))


def markdown(result):
    out = [f"## padfree Triton kernels on {result['device']['name']}", "",
           f"torch {result['device']['torch']}, triton {result['device']['triton']}, CUDA {result['device']['cuda']}; "
           f"device-to-device copy {result['copy_gbs']:.0f} GB/s (read + write). "
           f"Tests on the GPU: {result['tests'].get('summary', 'skipped')}", "",
           "### Multi-head attention, BERT-base shape (12 heads x 64), batch 16, lengths U[0.2 max, max]", "",
           f"varlen_attn signature: `{result['varlen_attn_signature']}`", "",
           "GPU time per call (CUDA graph replays, median), ms; 'eager' = padfree launched from Python.", "",
           "| dtype | max len | tokens | padfree ms | TFLOP/s | padfree eager ms | torch padded ms | SDPA padded ms "
           "| varlen_attn ms | x torch padded | x SDPA | x varlen_attn |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = [f"{r['dtype']} {r['max_len']}: {k} {v}" for r in result["attention"] for k, v in r.items()
             if k.endswith("_note") and v]
    for r in result["attention"]:
        va = r.get("varlen_attn_ms")
        va_ms = "n/a" if va is None else f"{va:.4f}"
        va_x = "n/a" if va is None else f"{va / r['padfree_ms']:.2f}"
        out.append(f"| {r['dtype']} | {r['max_len']} | {r['tokens']} | {r['padfree_ms']:.4f} | {r['tflops']:.0f} | "
                   f"{r['padfree_eager_ms']:.4f} | {r['torch_padded_ms']:.4f} | {r['sdpa_padded_ms']:.4f} | "
                   f"{va_ms} | {r['torch_padded_ms'] / r['padfree_ms']:.2f} | "
                   f"{r['sdpa_padded_ms'] / r['padfree_ms']:.2f} | "
                   f"{va_x} |")
    out += [f"- {n}" for n in notes]
    out += ["", "### Memory-bound kernels (GB/s over the fewest bytes moved; CUDA graph, rotated inputs)", "",
            "| op | dtype | shape | padfree ms | padfree GB/s | torch ms | torch GB/s | speedup |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result["memory_bound"]:
        out.append(f"| {r['op']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['padfree_ms']:.4f} | "
                   f"{r['padfree_gbs']:.0f} | {r['torch_ms']:.4f} | {r['torch_gbs']:.0f} | "
                   f"{r['torch_ms'] / r['padfree_ms']:.2f} |")
    if result.get("relative"):
        out += ["", "### Attention with relative terms, fp16, BERT-base heads, batch 16 (ms per call)", "",
                "| model terms | max len | tokens | table rows | padfree ms (graph) | padfree eager ms | "
                "torch backend eager ms | x torch backend (eager vs eager) | max abs diff |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in result["relative"]:
            if "error" in r:
                out.append(f"| {r['kind']} | {r['max_len']} | error: {r['error']} |||||||")
                continue
            out.append(f"| {r['kind']} | {r['max_len']} | {r['tokens']} | {r['table_rows']} | {r['padfree_ms']:.4f} | "
                       f"{r['padfree_eager_ms']:.4f} | {r['torch_backend_ms']:.4f} | "
                       f"{r['torch_backend_ms'] / r['padfree_eager_ms']:.2f} | {r['max_abs_diff_vs_torch']:.2e} |")
    if result.get("tune"):
        out += ["", "### Attention launch configurations (ms per call, CUDA graph, median)", "",
                "| dtype | d | max len | block_m | block_n | single tile | warps | stages | ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in result["tune"]:
            ms = "error" if r["ms"] is None else f"{r['ms']:.4f}"
            out.append(f"| {r['dtype']} | {r['head_dim']} | {r['max_len']} | {r['block_m']} | {r['block_n']} | "
                       f"{r['single_tile']} | {r['num_warps']} | {r['num_stages']} | {ms} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json_path")
    ap.add_argument("--md", help="also write the Markdown tables here")
    ap.add_argument("--tune", action="store_true", help="sweep attention launch configurations")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton
    props = torch.cuda.get_device_properties(0)
    result = dict(device=dict(name=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                              triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version()))

    def save():
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)

    result["tests"] = {} if args.skip_tests else run_tests()
    save()
    result["copy_gbs"] = copy_bandwidth()
    if args.tune:  # first, so that a run cut short still has it
        result["tune"] = []
        for dtype, lens, d, h in ((torch.float16, [64, 128, 256, 512, 1024], 64, 12),
                                  (torch.bfloat16, [128, 512], 64, 12), (torch.float16, [128, 512], 128, 6)):
            result["tune"] += tune_attention(dtype, lens, head_dim=d, heads=h)
            save()
    varlen_attn, sig = varlen_attn_fn()
    result["varlen_attn_signature"] = sig
    print("varlen_attn:", sig, flush=True)
    result["attention"] = []
    for dtype in (torch.float16, torch.bfloat16):
        for max_len in MAX_LENS:
            r = attention_case(max_len, dtype, varlen_attn)
            print(json.dumps(r), flush=True)
            result["attention"].append(r)
            save()
    result["memory_bound"] = []
    for dtype in (torch.float16, torch.bfloat16):
        result["memory_bound"] += memory_bound_cases(dtype)
    save()
    result["relative"] = []
    for kind in ("deberta-v3", "mpnet"):
        for max_len in (128, 512):
            try:
                r = relative_case(kind, max_len, torch.float16)
            except Exception as exc:  # noqa: BLE001  (never measured before: keep what ran so far)
                r = dict(kind=kind, max_len=max_len, error=repr(exc)[:300])
            print(json.dumps(r), flush=True)
            result["relative"].append(r)
            save()
    md = markdown(result)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main()
