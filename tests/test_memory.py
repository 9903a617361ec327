"""padfree.memory: level_memory() applies its settings, once, and they keep memory level under varying shapes.

Each check runs in a fresh interpreter: the settings are process-wide and oneDNN reads its cache sizes once.
"""
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from padfree import memory

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(memory._glibc() is None, reason="needs glibc (mallopt)")


def _run(code: str, env: dict | None = None, timeout: int = 120) -> str:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY",
                             "ONEDNN_VERBOSE", "DNNL_VERBOSE")}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_rss_bytes_reads_this_process():
    rss = memory.rss_bytes()
    if not Path("/proc/self/status").exists():
        assert rss == 0
    else:
        assert 10 * 2**20 < rss < 64 * 2**30


def test_level_memory_sets_caches_and_is_idempotent():
    out = _run("""
        import os, threading
        from padfree import memory
        assert memory.settings() is None
        results = []
        threads = [threading.Thread(target=lambda: results.append(memory.level_memory())) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert all(r == results[0] for r in results), results
        assert memory.level_memory() == results[0] == memory.settings()
        print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"],
              results[0].get("M_MMAP_THRESHOLD"))
    """)
    onednn, lru, mmap = out.split()
    assert onednn == lru == str(memory.PRIMITIVE_CACHE_CAPACITY)
    if memory._glibc() is not None:
        assert int(mmap) == memory.MMAP_THRESHOLD


def test_level_memory_keeps_the_users_cache_sizes():
    out = _run("""
        import os
        from padfree import memory
        s = memory.level_memory()
        print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], os.environ["LRU_CACHE_CAPACITY"],
              s["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], s["LRU_CACHE_CAPACITY"])
    """, env={"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7", "LRU_CACHE_CAPACITY": "9"})
    assert out.split() == ["7", "9", "7", "9"]


def test_onednn_reads_the_capacity_set_from_python():
    """The cache size set in os.environ by level_memory() (after torch is imported, before the first matrix
    product) is the one oneDNN uses: with capacity 0 the second identical product misses the cache again."""
    code = """
        import os
        import torch
        from padfree import memory
        if os.environ.get("ZERO"):
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "0"
        memory.level_memory()
        w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(64, 32))
        for _ in range(3):
            torch.ops.mkldnn._linear_pointwise(torch.randn(5, 32), w, None, "none", [], "")
    """
    with ThreadPoolExecutor(2) as ex:  # two independent interpreters at once
        default, zero = ex.map(lambda extra: _run(code, env={"ONEDNN_VERBOSE": "profile_create", **extra}),
                               ({}, {"ZERO": "1"}))
    if "cache_hit" not in default:
        pytest.skip("oneDNN verbose output does not report cache hits here")
    assert "cache_hit" not in zero


@glibc
def test_memory_levels_off_under_varying_shapes():
    """oneDNN linears (the model's FFN shapes) on a new token count at nearly every call, as batches of varied
    texts give: RSS stays level with level_memory(). RSS saws up and down between the trimmer's releases, so the
    level is the highest RSS of calls 100-199 and it is compared with the highest of calls 300-399. Measured when
    this test was written: with the same malloc settings but no trimmer thread +5 %, +5 % and +20 % in 3 runs
    (the growth depends on where the heap's holes fall, so the control does not always grow past the bound here:
    test_the_trimmer_hands_freed_heap_memory_back is the deterministic check of the mechanism); with
    level_memory() -2 % to +3 % in 3 runs, +7 % at most in 8. Only the fixed run is repeated here."""
    out = _run("""
        import random, sys
        from padfree import memory
        if len(sys.argv) > 1:
            memory._start_trimmer = lambda: None  # the control, run by hand: python -c CODE off
        memory.level_memory()
        import torch
        torch.manual_seed(0)
        shapes = [(1536, 384), (384, 1536)]
        ws = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k)) for n, k in shapes]
        rng = random.Random(0)
        rss = []
        for i in range(400):
            t = rng.randint(1, 1200)
            for (n, k), w in zip(shapes, ws):
                torch.ops.mkldnn._linear_pointwise(torch.randn(t, k), w, None, "none", [], "")
            rss.append(memory.rss_bytes())
        print(max(rss[100:200]), max(rss[300:]))
    """)
    warm, final = map(int, out.split())
    growth = (final - warm) / warm
    assert growth < 0.10, f"RSS grew {100 * growth:.0f}% with level_memory() ({warm >> 20} -> {final >> 20} MiB)"


_LONG_SEQUENCE = """
    import torch, transformers as t
    import torch.nn.functional as F
    import padfree
    from padfree.batch import PackedBatch
    from padfree.ops import torch_backend
    torch.manual_seed(0)
    cfg = t.ModernBertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=96, local_attention=128, max_position_embeddings=8192,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    enc = padfree.from_pretrained(t.ModernBertModel(cfg).eval())  # layers 0 global, 1-2 local (window 64)
    if {explicit}:  # the control: attention that holds its L x L scores (what a padded framework's eager path does)
        def explicit(q, k, v, attn_mask=None, scale=None):
            s = (q @ k.transpose(-1, -2)) * scale
            if attn_mask is not None:
                s = s.masked_fill(~attn_mask, float("-inf"))
            return s.softmax(-1) @ v
        torch_backend.F.scaled_dot_product_attention = explicit
    def status(field):  # kB
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
    enc.forward_packed(PackedBatch.from_sequences([list(range(3, 100)) * 5]))  # warm: 485 tokens
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = status("VmRSS")
    out = enc.forward_packed(PackedBatch.from_sequences([[3 + i % 97 for i in range(8192)]]))
    assert out.shape == (8192, 64) and torch.isfinite(out).all()
    print((status("VmHWM") - before) / 1024)
"""


def test_an_8192_token_sequence_needs_memory_linear_in_its_length():
    """One 8192-token document on the CPU path (ModernBERT: a global layer and sliding-window layers): its peak
    memory stays far below one head's 8192 x 8192 fp32 scores (256 MiB; all four heads: 1 GiB). The control, the
    same model with an attention that holds its scores, grows by more than that, so the measurement can tell."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    with ThreadPoolExecutor(2) as ex:  # two interpreters at once: each measures its own peak (VmHWM)
        linear, quadratic = (float(r.strip()) for r in ex.map(
            lambda explicit: _run(_LONG_SEQUENCE.format(explicit=explicit), timeout=300), (False, True)))
    assert linear < 160, f"peak RSS grew by {linear:.0f} MiB for one 8192-token sequence"
    assert quadratic > 768, f"the control grew by only {quadratic:.0f} MiB"


_HOLES = """
    import time
    from padfree import memory
    if {control}:
        memory._start_trimmer = lambda: None  # the control: the same settings without the trimmer thread
    memory.TRIM_PERIOD_S = 1.0
    memory.level_memory()
    import torch
    before = memory.rss_bytes()
    big, small = [], []
    for _ in range(100):  # 4 MiB blocks (heap: below the mmap threshold), each pinned in place by a small live one
        big.append(torch.ones(4 << 20, dtype=torch.uint8))
        small.append(torch.ones(1024, dtype=torch.uint8))
    held = memory.rss_bytes()
    del big  # 400 MiB of holes inside the heap: glibc keeps their pages resident
    deadline = time.monotonic() + 5
    # until the memory is back and the trim that released it is counted (it is counted after malloc_trim returns)
    while time.monotonic() < deadline and (memory.rss_bytes() > before + (100 << 20) or not memory.trims()):
        time.sleep(0.05)
    print(before >> 20, held >> 20, memory.rss_bytes() >> 20, memory.trims())
"""


@glibc
def test_the_trimmer_hands_freed_heap_memory_back():
    """Freed activations that sit between live small blocks stay resident in glibc's heap; the trimmer thread
    of level_memory() releases them at its next periodic trim (its period cut to 1 s here). The control, with
    the same malloc settings and no trimmer, keeps them: that is what the thread exists for."""
    with ThreadPoolExecutor(2) as ex:  # the check and its control in two interpreters at once
        fixed, control = ex.map(lambda c: _run(_HOLES.format(control=c)), (False, True))
    before, held, after, trims = map(int, fixed.split())
    assert held - before > 350, (before, held)
    assert after - before < 100 and trims >= 1, f"RSS {before} -> {held} -> {after} MiB after free, {trims} trims"
    before, held, after, trims = map(int, control.split())
    assert after - before > 350, f"the control released its holes by itself ({before} -> {held} -> {after} MiB)"
