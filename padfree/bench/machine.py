"""What every result file carries: the machine, library versions, git revision, date; and the matmul peak."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "sentence-transformers", "onnxruntime", "onnx", "openvino", "numpy", "triton", "padfree")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide the CPU kernels (AVX-512, bf16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return []


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_flags": cpu_flags(), "platform": platform.platform(), "python": platform.python_version(),
            # how torch's OpenMP workers wait between parallel regions: unset/ACTIVE spin, PASSIVE sleeps. On a
            # loaded machine spinning made every torch system 10-20x slower at small sizes (benchmarks/NOTES.md)
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default: spin, then sleep)")}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def describe(info: dict) -> str:
    """One line: the GPU name, or the CPU model with its cores."""
    if "gpu" in info:
        return f"{info['gpu']} ({info['gpu_memory_gib']} GiB), CUDA {info['cuda']}"
    wait = "" if "omp_wait_policy" not in info or info["omp_wait_policy"].startswith("unset") else \
        f", OMP_WAIT_POLICY={info['omp_wait_policy']}"
    return f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads{wait})"


def versions() -> dict:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    out["torch"] = torch.__version__
    return out


def git_revision() -> str:
    """``HEAD``'s commit of the padfree checkout, with ``-dirty`` if tracked files differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 4096, runs: int = 3) -> dict:
    """GFLOP/s of a large ``n x n x n`` matrix product of ``dtype``, the best of the paths PyTorch offers:
    ``torch.mm`` and, on CPU, oneDNN's linear on a prepacked weight (the path padfree's CPU backend uses, and
    faster than MKL's sgemm on AVX-512 machines). The peak is the best of them, so padfree's percentage is
    measured against the strongest matmul this machine runs, not a weak one. On a CPU whose plan computes bf16
    models in fp32 (no fast bf16 products: :attr:`padfree.cpu.CpuPlan.bf16_compute`), the bf16 peak is the fp32
    one, which is what padfree's bf16 runs there compute on (and a bf16 ``torch.mm`` of this size takes minutes)."""
    from padfree import cpu
    if dtype == torch.int8:  # no int8 product in PyTorch to measure a peak on (NOTES.md section 25)
        return {**matmul_peak(torch.float32, device, n, runs), "computed_as": "fp32: int8 rows against the fp32 peak"}
    if device == "cpu" and dtype == torch.bfloat16 and not cpu.current().bf16_compute:
        return {**matmul_peak(torch.float32, device, n, runs), "computed_as": "fp32 (bf16 computes in fp32 here)"}
    a = torch.randn(n, n, dtype=dtype, device=device)
    w = torch.randn(n, n, dtype=dtype, device=device)
    paths = {"torch.mm": lambda: a @ w}
    if device == "cpu" and torch.backends.mkldnn.is_available() and (
            dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        paths["onednn_linear_prepacked"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    out = {}
    for name, fn in paths.items():
        fn()
        best = float("inf")
        for _ in range(runs):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n ** 3 / best / 1e9
    return {"n": n, "gflops_by_path": out, "gflops": max(out.values())}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
