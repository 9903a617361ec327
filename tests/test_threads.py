"""One encoder called from many threads at once: each thread must get exactly its single-threaded result.

The batches have the same token count but different lengths, so a forward that used another thread's
per-batch facts (the equal-length runs of attention, a relative-distance index) would not fail on a shape:
it would silently attend across the wrong sequences. The interpreter is made to switch threads very often."""
import sys
import threading

import pytest
import torch

import padfree

from family_zoo import make

T = 40
ROUNDS = 100
LENGTHS = [[40], [20, 20], [10, 10, 10, 10], [1, 39], [5, 5, 30], [8] * 5, [13, 13, 14], [2, 2, 2, 34]]


@pytest.fixture
def one_op_thread_fast_switching():
    """Each op on one thread (so results are bitwise reproducible and the Python threads are what runs at once),
    and thread switches as often as the interpreter can make them."""
    interval, torch_threads = sys.getswitchinterval(), torch.get_num_threads()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)
    torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("family,backend", [("bert", "auto"), ("bert", "torch"), ("mpnet", "auto")])
def test_concurrent_forwards_equal_single_threaded(family, backend, one_op_thread_fast_switching):
    model = make(family, 0, num_hidden_layers=24)
    enc = padfree.from_pretrained(model, backend=backend)
    g = torch.Generator().manual_seed(0)
    batches = [padfree.PackedBatch.from_sequences([torch.randint(3, 60, (n,), generator=g).tolist() for n in ls])
               for ls in LENGTHS]
    assert {b.num_tokens for b in batches} == {T}
    expected = [enc.forward_packed(b) for b in batches]
    enc = padfree.from_pretrained(model, backend=backend)  # fresh: its first forwards fill its caches at once
    errors, mismatches = [], []
    start = threading.Barrier(len(batches))

    def work(i):
        try:
            start.wait()
            for _ in range(ROUNDS):
                out = enc.forward_packed(batches[i])
                if not torch.equal(out, expected[i]):
                    mismatches.append((i, float((out - expected[i]).abs().max())))
        except Exception as e:  # noqa: BLE001 - reported below with the thread's batch
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"threads raised: {errors[:3]}"
    assert not mismatches, f"threads got another batch's result: {mismatches[:5]}"
