"""Groundwork for issue 28 (int8 on the CPU): which int8 product paths this CPU and torch offer, and how fast each
runs at BERT-base's four linear shapes against padfree's fp32 product (oneDNN on a prepacked weight), on one
thread count, interleaved. Prints a table; ``--out FILE`` also writes it with the machine's facts.

    python benchmarks/int8_products.py --tokens 2048 --out benchmarks/results/cpu-<machine>-int8-products.txt

Paths timed (each a whole product: what a layer would call, including the activation's quantization):
- ``fp32``: ``torch.ops.mkldnn._linear_pointwise`` on a prepacked fp32 weight (padfree's fp32 path).
- ``int_mm``: per-token dynamic int8 activation (absmax / 127), per-output-channel int8 weight, ``torch._int_mm``
  (int32 accumulation), dequantized with the two scales and the bias added: the arithmetic issue 28 asks for,
  with unfused quantize / dequantize steps around the integer product.
- ``int_mm only``: the integer product alone (what a fused epilogue would leave to pay).
- ``ao dynamic``: ``torch.ao.nn.quantized.dynamic.Linear`` (per-tensor dynamic activation, per-channel weight;
  the x86 engine): what "torch quantize_dynamic" peers (Infinity's int8) run.
- ``onednn u8s8``: dynamic per-tensor uint8 activation (zero point 128), per-channel int8 weight prepacked for
  oneDNN (``torch.ops.onednn.qlinear_prepack``), ``torch.ops.onednn.qlinear_pointwise`` with fp32 output and the
  bias fused (it also fuses GELU and a residual add); ``onednn only``: that call without the quantization.
  ``onednn u7s8``: the same with 7-bit activations (+-63 steps): without VNNI, oneDNN multiplies with AVX2's
  ``vpmaddubsw``, whose int16 sums of two u8 x s8 products saturate with 8-bit activations (the error column
  shows it), as fbgemm's ``reduce_range`` avoids.
- ``padfree blocks``: padfree's own fp32 product (the native stack's, for short batches: pack_blocks).
- ``padfree int8``: padfree's int8 product (``int8_linear``: per-column int8 weight, per-row activations in 12 bits
  held as int16, vpmaddwd; quantization, dequantization and bias included); ``padfree int8/8``: the same with 8-bit
  activations (``levels=127``), to show what the extra bits cost (nothing) and buy (the error column).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

SHAPES = {"qkv": (768, 2304), "attn_out": (768, 768), "ffn_in": (768, 3072), "ffn_out": (3072, 768)}  # (K, N)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``[M, K]`` fp32 -> (int8 ``[M, K]``, fp32 scales ``[M, 1]``)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(x / scale).clamp_(-127, 127).to(torch.int8), scale


def int8_linear(x: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    xq, x_scale = quantize_rows(x)
    return torch._int_mm(xq, wq_t).to(torch.float32) * (x_scale * w_scale) + bias


def quantize_tensor_u8(x: torch.Tensor, levels: int = 127) -> tuple[torch.Tensor, float]:
    """Dynamic per-tensor uint8 with zero point ``levels + 1`` (a symmetric range of ``+-levels`` steps):
    ``[M, K]`` fp32 -> (uint8, scale). 127 levels: 8 bits; 63: 7 bits."""
    scale = float(x.abs().amax().clamp_min(1e-12)) / levels
    return (torch.round(x / scale) + levels + 1).clamp_(1, 2 * levels + 1).to(torch.uint8), scale


def onednn_linear(x, packed_q, w_scale, w_zp, bias, levels: int = 127) -> torch.Tensor:
    xq, x_scale = quantize_tensor_u8(x, levels)
    return torch.ops.onednn.qlinear_pointwise(xq, x_scale, levels + 1, packed_q, w_scale, w_zp, bias, 1.0, 0,
                                              torch.float32, "none", [], "")


def paths(k: int, n: int, m: int) -> dict:
    """Callables of each path at one shape, and the fp32 reference output with their max errors relative to it."""
    g = torch.Generator().manual_seed(k * n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) * 0.1
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    w_scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127           # [N]
    wq_t = torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous()  # [K, N]
    xq, _ = quantize_rows(x)
    ao = torch.ao.nn.quantized.dynamic.Linear(k, n, dtype=torch.qint8)
    qw = torch.quantize_per_channel(w, w_scale.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
    ao.set_weight_bias(qw, b)
    packed_q = torch.ops.onednn.qlinear_prepack(torch.round(w / w_scale[:, None]).clamp(-127, 127).to(torch.int8),
                                                [m, k])
    w_zp = torch.zeros(n, dtype=torch.int64)
    xu8, xs = quantize_tensor_u8(x)
    out = {
        "fp32": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
        "int_mm": lambda: int8_linear(x, wq_t, w_scale, b),
        "int_mm only": lambda: torch._int_mm(xq, wq_t),
        "ao dynamic": lambda: ao(x),
        "onednn u8s8": lambda: onednn_linear(x, packed_q, w_scale, w_zp, b),
        "onednn u7s8": lambda: onednn_linear(x, packed_q, w_scale, w_zp, b, levels=63),
        "onednn only": lambda: torch.ops.onednn.qlinear_pointwise(xu8, xs, 128, packed_q, w_scale, w_zp, b, 1.0, 0,
                                                                  torch.float32, "none", [], ""),
    }
    from padfree import cpu
    from padfree.ops import native
    mod, isa = native.module(), cpu.current().int8_isa
    if mod is not None and isa:
        blocks = mod.pack_blocks(w)
        pq, ps = mod.pack_int8(w)
        out["padfree blocks"] = lambda: mod.blocks_linear(x, blocks, n, b, cpu.current().native_isa)
        out["padfree int8"] = lambda: mod.int8_linear(x, pq, ps, n, b, "none", None, None, isa)
        out["padfree int8/8"] = lambda: mod.int8_linear(x, pq, ps, n, b, "none", None, 127, isa)
    ref = (x.double() @ w.double().t() + b.double())
    errors = {name: float(((fn().double() - ref).abs().max() / ref.abs().max()))
              for name, fn in out.items() if not name.endswith("only")}
    return out, errors


def _revision() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=__file__.rsplit("/", 2)[0], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="rows M of each product (default 2048: 16 x 128)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--reps", type=int, default=10, help="calls per path per round (default 10)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    from padfree import cpu
    profile = cpu.current().profile
    lines = [f"# int8 product paths, M={args.tokens} tokens, {torch.get_num_threads()} threads",
             f"# machine: {profile.model_name} ({profile.uarch}), {profile.cores} cores; torch {torch.__version__}; "
             f"python {platform.python_version()}; padfree {_revision()}",
             f"# features: {profile.isa_summary() if callable(profile.isa_summary) else profile.isa_summary}",
             "# median ms per call over rounds x reps, interleaved; speed-up = fp32 / path; rel. error: max |out -"
             " fp64 reference| / max |reference|",
             f"{'shape':10} {'K x N':>11} {'path':15} {'ms':>8} {'vs fp32':>8} {'rel.err':>9}"]
    total: dict[str, float] = {}
    for name, (k, n) in SHAPES.items():
        fns, errors = paths(k, n, args.tokens)
        first = {key: median_ms(fn, 1) for key, fn in fns.items()}  # warm up: oneDNN primitives, packing
        reps = {key: 1 if first[key] > 5 * first["fp32"] else args.reps for key in fns}  # a slow path: once a round
        times = {key: [] for key in fns}
        for _ in range(args.rounds):
            for key, fn in fns.items():
                times[key].append(median_ms(fn, reps[key]))
        base = statistics.median(times["fp32"])
        for key in fns:
            ms = statistics.median(times[key])
            total[key] = total.get(key, 0.0) + ms
            err = f"{errors[key]:.2e}" if key in errors else "-"
            lines.append(f"{name:10} {f'{k}x{n}':>11} {key:15} {ms:8.3f} {base / ms:7.2f}x {err:>9}")
    lines.append(f"{'layer':10} {'all four':>11} " + "; ".join(f"{k} {v:.2f} ms ({total['fp32'] / v:.2f}x)"
                                                              for k, v in total.items()))
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
