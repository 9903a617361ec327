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
import time

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
    """This process's resident set size in bytes (VmRSS, read from ``/proc/self/statm``), 0 where /proc is
    unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def settings() -> dict[str, object] | None:
    """What :func:`level_memory` applied (None before it was called)."""
    return None if _applied is None else dict(_applied)


MMAP_THRESHOLD = 32 << 20
"""Bytes from which glibc serves an allocation by its own mmap: its ceiling on 64-bit systems, fixed there so that
it no longer moves (smaller tensors are reused from the heap, without page faults)."""
TRIM_THRESHOLD = 1 << 30
"""glibc's own trim of the heap's top on free (``M_TRIM_THRESHOLD``), set out of reach: the trimmer thread
releases free memory instead, far less often."""
PRIMITIVE_CACHE_CAPACITY = 128
"""Entries kept by oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024) and by
ideep's operator cache inside PyTorch (``LRU_CACHE_CAPACITY``, default 1024)."""
_CACHE_VARIABLES = (("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY"), ("LRU_CACHE_CAPACITY",))
TRIM_CHECK_S = 0.2
"""How often the trimmer thread reads the resident set size."""
TRIM_GROWTH, TRIM_SLACK = 0.15, 32 << 20
"""The trimmer calls ``malloc_trim(0)`` once RSS exceeds ``floor * (1 + TRIM_GROWTH) + TRIM_SLACK``, where the
floor is the RSS right after its last trim (lowered whenever RSS falls below it)."""
TRIM_PERIOD_S = 30.0
"""... and at least this often, so that memory freed after a burst goes back to the system once it is quiet."""
_trims = 0  # how many times the trimmer released memory (read by tests)


def _trimmer() -> None:
    global _trims
    floor, last = rss_bytes(), time.monotonic()
    while True:
        time.sleep(TRIM_CHECK_S)
        rss = rss_bytes()
        if rss > floor * (1 + TRIM_GROWTH) + TRIM_SLACK or time.monotonic() - last >= TRIM_PERIOD_S:
            trim()
            _trims += 1
            floor, last = rss_bytes(), time.monotonic()
        elif rss < floor:
            floor = rss


def _start_trimmer() -> None:
    threading.Thread(target=_trimmer, name="padfree-trim", daemon=True).start()


def trims() -> int:
    """How many times the trimmer thread of :func:`level_memory` has released free memory."""
    return _trims


def level_memory() -> dict[str, object]:
    """Make this process's resident memory level off under batches of ever-changing sizes; returns what it set.

    Call once at start-up, before the model is loaded and before the first CPU matrix product (oneDNN reads
    its cache sizes when it first starts); later calls do nothing and return the same settings. Thread-safe.

    Two causes, both from a new tensor shape at (almost) every batch:

    - Heap fragmentation: activations of ever-different sizes come from malloc's heap (glibc's dynamic mmap
      threshold rises to 32 MiB as large blocks are freed), interleave there with long-lived small blocks, and
      the freed holes stay resident. ``mallopt`` fixes the mmap threshold at glibc's 32 MiB ceiling and turns
      glibc's own top-of-heap trimming off, so activations below it are reused from the heap without page
      faults; a daemon thread (``padfree-trim``) reads RSS every :data:`TRIM_CHECK_S` seconds and calls
      ``malloc_trim(0)``, which hands every free page back to the system, once RSS has grown past
      :data:`TRIM_GROWTH` + :data:`TRIM_SLACK` over its level after the last trim, and every
      :data:`TRIM_PERIOD_S` seconds in any case. RSS thus stays within about 15% + 32 MiB of the most memory the
      work has in use at once. (A 1 MiB threshold, which
      releases every large block on free, also keeps memory level, but each activation then faults its pages
      in anew: about 15% slower on W2; benchmarks/NOTES.md section 12.)
    - oneDNN's primitive cache and ideep's operator cache keep up to 1024 compiled primitives each, one set per
      distinct token count; they are capped at :data:`PRIMITIVE_CACHE_CAPACITY` through their environment
      variables, unless the user set those variables already (theirs are kept).

    Where the C library is not glibc the malloc part (and the thread) is skipped (logged at debug level).
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
        elif mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
            applied["M_MMAP_THRESHOLD"] = MMAP_THRESHOLD
            applied["M_TRIM_THRESHOLD"] = TRIM_THRESHOLD
            applied["trimmer"] = {"check_s": TRIM_CHECK_S, "growth": TRIM_GROWTH, "slack": TRIM_SLACK}
            _start_trimmer()
            os.register_at_fork(after_in_child=_start_trimmer)  # a forked worker has no threads of its parent
        else:
            log.debug("level_memory: mallopt(M_MMAP_THRESHOLD, %d) failed", MMAP_THRESHOLD)
        _applied = applied
        return dict(applied)
