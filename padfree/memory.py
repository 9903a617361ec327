"""Keep a long-lived process's memory level under ever-changing batch shapes.

A server (or a batch job) encoding batches of varying size allocates tensors of a different size at every
forward. Left alone, its resident memory keeps growing (see :func:`level_memory` for the causes and the
measurements). Call :func:`level_memory` once at start-up, before the model is loaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_TEST = -7
M_ARENA_MAX = -8

_lock = threading.Lock()
_applied: dict[str, object] | None = None  # what level_memory() set (None: not called yet)
_libc = None
_libc_loaded = False


def _glibc():
    """The C library if it is glibc (it has mallopt / malloc_trim / mallinfo2), else None."""
    global _libc, _libc_loaded
    if not _libc_loaded:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                cand = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                cand.gnu_get_libc_version.restype = ctypes.c_char_p
                cand.gnu_get_libc_version()
                cand.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                cand.mallopt.restype = ctypes.c_int
                cand.malloc_trim.argtypes = [ctypes.c_size_t]
                cand.malloc_trim.restype = ctypes.c_int
                lib = cand
            except (OSError, AttributeError):  # musl and others: no gnu_get_libc_version
                lib = None
        _libc, _libc_loaded = lib, True
    return _libc


def mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt(param, value)``; False where it failed or the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(param, value))


def trim() -> bool:
    """``malloc_trim(0)``: hand the free pages of every malloc arena back to the system. True if any was
    released; False also where the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap_summary() -> str:
    """One line on the C heap (glibc ``mallinfo2``, all arenas): bytes in heaps, in use in
    them, free in them, and in direct mmaps. Empty where unavailable."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return ""
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    mib = 2 ** 20
    return (f"heap {m.arena / mib:.0f} MiB (used {m.uordblks / mib:.0f}, free {m.fordblks / mib:.0f}) "
            f"mmap {m.hblkhd / mib:.0f} MiB in {m.hblks}")


def rss_bytes() -> int:
    """This process's resident set size in bytes (VmRSS), 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def settings() -> dict[str, object] | None:
    """What :func:`level_memory` applied (None before it was called)."""
    return None if _applied is None else dict(_applied)


MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc serves an allocation by its own mmap (returned to the system when freed)."""
PRIMITIVE_CACHE_CAPACITY = 128
"""Entries kept by oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) and by
ideep's operator cache inside PyTorch (``LRU_CACHE_CAPACITY``, default 1024)."""
_CACHE_VARIABLES = (("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"), ("LRU_CACHE_CAPACITY",))


def level_memory() -> dict[str, object]:
    """Make this process's resident memory level off under batches of ever-changing sizes; returns what it set.

    Call once at start-up, before the model is loaded and before the first CPU matrix product (oneDNN reads
    its cache sizes when it first starts); later calls do nothing and return the same settings. Thread-safe.

    Two causes, both from a new tensor shape at (almost) every batch:

    - glibc's dynamic mmap threshold: freeing a large mmapped block raises the threshold to that block's size
      (up to 32 MiB), so from then on every activation tensor below it comes from the heap, where tensors of
      ever-different sizes interleave with long-lived small blocks and the freed space is never given back.
      ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` fixes the threshold (and with it the trim threshold): each tensor of
      1 MiB or more is its own mapping, returned to the system when freed.
    - oneDNN's primitive cache and ideep's operator cache keep up to 1024 compiled primitives each, one set per
      distinct token count; they are capped at :data:`PRIMITIVE_CACHE_CAPACITY` through their environment
      variables, unless the user set those variables already (theirs are kept).

    Where the C library is not glibc the mallopt part is skipped (logged at debug level).
    """
    global _applied
    with _lock:
        if _applied is not None:
            return dict(_applied)
        applied: dict[str, object] = {}
        for names in _CACHE_VARIABLES:
            present = [n for n in names if n in os.environ]
            if present:
                applied[present[0]] = os.environ[present[0]]
            else:
                os.environ[names[0]] = str(PRIMITIVE_CACHE_CAPACITY)
                applied[names[0]] = str(PRIMITIVE_CACHE_CAPACITY)
        if _glibc() is None:
            log.debug("level_memory: the C library is not glibc; malloc settings left as they are")
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            applied["M_MMAP_THRESHOLD"] = MMAP_THRESHOLD
        else:
            log.debug("level_memory: mallopt(M_MMAP_THRESHOLD, %d) failed", MMAP_THRESHOLD)
        _applied = applied
        return dict(applied)
