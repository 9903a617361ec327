"""padfree's native code: ``small_layers.cpp``, built for this machine on first use and cached.

The CPU backend runs a short batch's post-LN layer stack through it in one call
(:func:`padfree.ops.onednn_backend.post_ln_layers`): its own products, attention, activation and LayerNorm, as
AVX-512 and as AVX2 + FMA kernels (each call takes the CPU plan's ISA, :mod:`padfree.cpu`), without Python between
them. It is compiled with PyTorch's extension builder (a C++ compiler and
``ninja`` needed) the first time a process needs it, ~45 s, into ``$PADFREE_CACHE`` (default ``~/.cache/padfree``)
under a name that hashes the source, the PyTorch version and the flags, so later processes load the built module in
milliseconds and an upgrade rebuilds it. ``make`` builds it at install (``python -m padfree.ops.native``). If it
cannot be built, padfree logs why once and runs the Python forward (same results within fp32 rounding);
``PADFREE_NATIVE=0`` never builds or uses it. The CPU encoder also calls its :func:`pin_workers` before each
forward (torch's OpenMP workers one per CPU; ``PADFREE_PIN_THREADS=0`` leaves them).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..cpu import CpuPlan

log = logging.getLogger("padfree")
SOURCE = Path(__file__).with_name("small_layers.cpp")
# OpenMP: at::parallel_for is a header template, threaded only where the module itself is built with it
_FLAGS = ["-O3", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" once loaded, or "why_not" once it failed


def build_dir() -> tuple[str, Path]:
    """The module's name (source, PyTorch version and flags hashed in) and the directory it is built and cached in."""
    key = SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_FLAGS).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    name = f"padfree_small_layers_{digest}"
    root = Path(os.environ.get("PADFREE_CACHE", Path.home() / ".cache" / "padfree"))
    return name, root / "native" / name


def module() -> ModuleType | None:
    """The native module, built on the first call of a process that has none cached (under a lock: one build);
    None when it cannot be built (:func:`why_not` says why; logged once). Whether a path uses it is the CPU plan's
    decision (:attr:`padfree.cpu.CpuPlan.native_isa`: empty with ``PADFREE_NATIVE=0``)."""
    state = _state
    if "module" in state or "why_not" in state:
        return state.get("module")
    with _lock:
        if "module" not in state and "why_not" not in state:
            try:
                state["module"] = _load()
            except Exception as e:  # noqa: BLE001 - any build failure means: run the Python forward
                state["why_not"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}"
                log.warning("padfree: native small-batch layers unavailable, using the Python forward (%s)",
                            state["why_not"])
    return state.get("module")


def pin_workers(plan: CpuPlan) -> None:
    """Pin the OpenMP worker threads serving the calling thread's torch ops each to its own CPU, once per calling
    thread, where the process may run on exactly as many CPUs as torch has threads (``small_layers.cpp``,
    ``pin_workers``, says why: a worker the scheduler put on its caller's CPU stalled batch-1 calls; NOTES.md
    section 19).
    The CPU encoder calls it before each forward; without the native module, or where the plan says not to
    (``PADFREE_PIN_THREADS=0``, ``PADFREE_NATIVE=0``), it does nothing."""
    if plan.pin_threads and plan.native_isa and (mod := module()) is not None:
        mod.pin_workers()


def why_not() -> str | None:
    """Why the native module could not be built or loaded (None: it was, or it was not asked for yet)."""
    return _state.get("why_not")


def _load() -> ModuleType:
    name, directory = build_dir()
    built = directory / f"{name}.so"
    if built.exists():  # a module built by an earlier process: import it (no compiler, no build tools)
        spec = importlib.util.spec_from_file_location(name, built)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    from torch.utils.cpp_extension import load  # the build tools, only when building
    directory.mkdir(parents=True, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)  # the environment's own ninja (the ninja package), if any
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    log.info("padfree: building the native small-batch layers into %s (once per machine, ~45 s)", directory)
    return load(name, [str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


if __name__ == "__main__":  # python -m padfree.ops.native: build (or find) the module, say where or why not
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..cpu import current
    if not current().native_isa:
        print(f"padfree native small-batch layers: not used ({current().reasons['native_isa']})")
        sys.exit(0)
    mod = module()
    print(f"padfree native small-batch layers: {build_dir()[1] if mod else 'unavailable: ' + str(why_not())}")
    sys.exit(0 if mod else 1)
