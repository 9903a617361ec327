"""The CUDA-graph runner's bucket logic (static token slots, zero-length sequence slots, spare tokens in no
sequence), run without a graph on the CPU: it must give exactly the eager forward's result."""
import pytest
import torch
from transformers import BertConfig, BertModel

import padfree
from padfree.cuda_graphs import CudaGraphEncoder


@pytest.fixture(scope="module")
def enc():
    torch.manual_seed(0)
    hf = BertModel(BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                              vocab_size=300, max_position_embeddings=80))
    return padfree.from_pretrained(hf)


BUCKETS = (16, 64, 128)


def _batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return padfree.PackedBatch.from_sequences([torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths])


@pytest.mark.parametrize("lengths,bucket", [
    ([3, 10, 1], 16),       # spare token slots and empty sequence slots
    ([16], 16),             # exactly a bucket: no spare slot
    ([3, 17, 1], 64),
    ([30, 30, 4], 64),
    ([1] * 8, 16),          # max_batch sequence slots, all used
    ([80, 47], 128),        # the largest bucket, the model's longest sequence (max_seqlen = min(128, 80))
])
def test_bucketed_forward_equals_eager(enc, lengths, bucket):
    """Each case goes through its bucket's static layout (checked: the bucket was built and no other), and
    every real token gets exactly the plain eager forward's result."""
    runner = CudaGraphEncoder(enc, buckets=BUCKETS, max_batch=8, capture=False)
    batch = _batch(lengths, len(lengths))
    out = runner.forward_packed(batch)
    assert list(runner._graphs) == [bucket]
    torch.testing.assert_close(out, enc.forward_packed(batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [[80, 50], [2] * 9])
def test_batches_beyond_the_buckets_run_eagerly(enc, lengths):
    """More tokens than the largest bucket, or more sequences than max_batch: the eager forward, no bucket."""
    runner = CudaGraphEncoder(enc, buckets=BUCKETS, max_batch=8, capture=False)
    batch = _batch(lengths, 0)
    assert torch.equal(runner.forward_packed(batch), enc.forward_packed(batch))
    assert not runner._graphs


def test_static_buffers_refilled_between_batches(enc):
    """One runner, several batches through the same bucket: the in-place refilled offsets must be re-read."""
    runner = CudaGraphEncoder(enc, buckets=(64,), max_batch=8, capture=False)
    batches = [padfree.PackedBatch.from_sequences([list(range(1, n + 1)) for n in lengths])
               for lengths in ([3, 17, 1], [20, 20], [5] * 8)]
    expected = [enc.forward_packed(b) for b in batches]
    got = [runner.forward_packed(b) for b in batches]  # back to back: only the static buffers change
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_bucketed_forward_still_validates(enc):
    runner = CudaGraphEncoder(enc, buckets=(16,), max_batch=4, capture=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        runner.forward_packed(padfree.PackedBatch.from_sequences([[1, 999]]))


def test_capture_needs_cuda_and_triton(enc):
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphEncoder(enc)


@pytest.mark.parametrize("family,backend", [("mpnet", "auto"), ("deberta-v2", "auto"), ("bert", "triton"),
                                            ("deberta-v2", "triton")])
def test_bucketed_forward_families(family, backend, request):
    """The static layout of a bucket (sequence slots of length 0, token slots in no sequence, max_seqlen = the
    bucket, so a relative model's distance index covers more rows than the batch needs) gives every real token
    exactly the eager result: on the CPU backends, and through the Triton kernels that CUDA graphs replay (in
    the interpreter on the CPU, captured on a GPU)."""
    from family_zoo import make
    gpu = backend == "triton" and torch.cuda.is_available()
    if backend == "triton":
        request.getfixturevalue("triton_everywhere")
    device = "cuda" if gpu else "cpu"
    enc = padfree.from_pretrained(make(family, 0), device=device, backend=backend)
    runner = CudaGraphEncoder(enc, buckets=(48,), max_batch=6, capture=gpu)
    for lengths in ([3, 17, 1], [40], [9, 9, 20]):
        batch = padfree.PackedBatch.from_sequences([list(range(3, 3 + n)) for n in lengths], device=device)
        torch.testing.assert_close(runner.forward_packed(batch), enc.forward_packed(batch), atol=1e-5, rtol=1e-5)
