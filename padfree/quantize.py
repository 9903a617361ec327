"""Quantized embeddings, as sentence-transformers' ``quantize_embeddings`` defines them (same arithmetic, same bits).

- ``int8`` / ``uint8``: each dimension cut into 255 equal steps between a lower and an upper bound,
  ``floor((x - low) / step)`` clipped to ``[0, 255]`` (int8: minus 128). The bounds (``ranges``, ``[2, D]``: the
  lows, then the highs) come from a calibration set (per-dimension min / max, :func:`calibration_ranges`), or,
  where none is given, from each vector itself (its own min and max for every dimension). sentence-transformers'
  default takes the ranges of the batch being quantized, which makes a vector depend on its batch-mates; a
  server or a job cannot have that (the same text would quantize differently with other texts beside it), so
  padfree's default is per vector: deterministic whatever the batching.
- ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte, big-endian within the byte
  (``numpy.packbits``); ``ubinary`` the bytes as uint8, ``binary`` the bytes minus 128 as int8. ``[n, ceil(D/8)]``.
- ``float32``: the vectors as they are.
"""
from __future__ import annotations

import numpy as np

PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")
DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
RANGED = ("int8", "uint8")  # the precisions that use ranges


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`; ``ValueError`` naming them otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def width(dimensions: int, precision: str) -> int:
    """The row width of ``dimensions``-wide vectors at ``precision``: ``ceil(D/8)`` bytes for the binary ones."""
    return -(-dimensions // 8) if precision.endswith("binary") else dimensions


def calibration_ranges(calibration) -> np.ndarray:
    """``[2, D]``: the per-dimension min and max of calibration embeddings ``[n, D]`` (n >= 1), in their dtype
    (float64 for integers), as sentence-transformers computes them."""
    x = np.asarray(calibration.cpu().numpy() if hasattr(calibration, "cpu") else calibration)
    if x.ndim != 2 or not len(x) or not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"calibration_embeddings must be a numeric [n, D] array with n >= 1; got shape "
                         f"{x.shape} of {x.dtype}")
    return check_ranges(np.vstack((np.min(x, axis=0), np.max(x, axis=0))), x.shape[1])


def check_ranges(ranges, dimensions: int) -> np.ndarray:
    """``ranges`` as a finite float ``[2, dimensions]`` array (integers as float64); ``ValueError`` naming the
    expected shape otherwise."""
    r = np.asarray(ranges)
    if not np.issubdtype(r.dtype, np.number) or r.shape != (2, dimensions):
        raise ValueError(f"ranges must be a numeric [2, {dimensions}] array (per-dimension min, then max, for "
                         f"{dimensions}-wide embeddings); got shape {r.shape} of {r.dtype}")
    if not np.issubdtype(r.dtype, np.floating):
        r = r.astype(np.float64)
    if not np.isfinite(r).all():
        raise ValueError("ranges must be finite")
    return r


def quantize(x, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Vectors ``x [n, D]`` (float numpy or tensor) at ``precision``: int8 / uint8 ``[n, D]`` (by ``ranges``
    ``[2, D]``, else each vector's own min and max), binary int8 / ubinary uint8 ``[n, ceil(D/8)]``, or float32
    ``[n, D]``."""
    x = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)
    check_precision(precision)
    if precision == "float32":
        return x.astype(np.float32, copy=False)
    if precision in RANGED:
        if ranges is None:  # per vector: its own min and max for every dimension
            starts, highs = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        else:
            starts, highs = ranges[0, :], ranges[1, :]
        steps = (highs - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q = np.clip(np.floor((x - starts) / steps), 0, 255)
        return q.astype(np.uint8) if precision == "uint8" else (q - 128).astype(np.int8)
    packed = np.packbits(x > 0, axis=-1)  # [n, ceil(D/8)]
    return packed if precision == "ubinary" else (packed - 128).astype(np.int8)
