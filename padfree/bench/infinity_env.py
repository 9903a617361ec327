"""A private virtual environment for Infinity (``infinity-emb``), the serving peer of ``--workload serve``.

Infinity's pins conflict with padfree's (numpy<2, sentence-transformers<4, hence transformers 4.x), so it never
goes into the project's environment: it gets its own venv under a cache directory, built once (a stamp file
records what was installed) and reused. torch is installed first, pinned to the same release as ours (the CPU
wheel pip finds on this machine), and kept there by a constraint while Infinity's own dependencies resolve
(an unpinned resolve would pull gigabytes of CUDA packages).

    python -m padfree.bench.infinity_env          # build (or find) it; prints the infinity_emb executable

``PADFREE_PEERS_DIR`` overrides the cache root (default ``~/.cache/padfree/peers``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

INFINITY_VERSION = "0.0.78"
TORCH_VERSION = "2.13.0"
# Infinity 0.0.78's torch engine, as tried by hand: numpy<2 and sentence-transformers<4 (it calls APIs removed
# later); transformers 4.x follows from them.
PINS = ("numpy<2", "sentence-transformers<4", "transformers<5")


def peers_dir() -> Path:
    return Path(os.environ.get("PADFREE_PEERS_DIR") or Path.home() / ".cache" / "padfree" / "peers")


def venv_dir(version: str = INFINITY_VERSION) -> Path:
    return peers_dir() / f"infinity-{version}"


def _stamp(version: str) -> dict:
    return {"infinity-emb": version, "torch": TORCH_VERSION, "pins": list(PINS), "python": sys.version.split()[0]}


def executable(version: str = INFINITY_VERSION) -> Path | None:
    """The ``infinity_emb`` executable if the venv is built and its stamp matches, else None."""
    root = venv_dir(version)
    exe, stamp = root / "bin" / "infinity_emb", root / "padfree-stamp.json"
    try:
        if exe.exists() and json.loads(stamp.read_text()) == _stamp(version):
            return exe
    except (OSError, ValueError):
        pass
    return None


def ensure(version: str = INFINITY_VERSION, log=print) -> Path:
    """Build the venv if needed (idempotent) and return the path of its ``infinity_emb``. Takes minutes the first
    time; raises ``RuntimeError`` with pip's tail if an install fails."""
    found = executable(version)
    if found:
        return found
    root = venv_dir(version)
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = getattr(sys, "_base_executable", None) or sys.executable
    log(f"infinity venv: creating {root} with {base}")
    _run([base, "-m", "venv", "--clear", str(root)])
    py = str(root / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    log(f"infinity venv: torch=={TORCH_VERSION}")
    _run(pip + [f"torch=={TORCH_VERSION}"])
    constraints = root / "padfree-constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n" + "".join(p + "\n" for p in PINS))
    log(f"infinity venv: infinity-emb[server,torch]=={version} (constraints: {', '.join(PINS)})")
    _run(pip + ["-c", str(constraints), f"infinity-emb[server,torch]=={version}", *PINS])
    exe = root / "bin" / "infinity_emb"
    if not exe.exists():
        raise RuntimeError(f"infinity venv: {exe} missing after install")
    (root / "padfree-stamp.json").write_text(json.dumps(_stamp(version)) + "\n")
    log(f"infinity venv: ready in {time.perf_counter() - t0:.0f} s: {exe}")
    return exe


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


if __name__ == "__main__":
    print(ensure(log=lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", flush=True)))
