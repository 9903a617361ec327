"""Segment pooling over cu_seqlens against a per-sequence loop."""
import pytest
import torch

from padfree import PackedBatch, pool


@pytest.mark.parametrize("mode, ref", [
    ("cls", lambda s: s[0]), ("lasttoken", lambda s: s[-1]), ("mean", lambda s: s.mean(0)),
    ("max", lambda s: s.max(0).values), ("mean_sqrt_len", lambda s: s.sum(0) / len(s) ** 0.5),
])
def test_pool_matches_per_sequence_loop(mode, ref):
    batch = PackedBatch.from_sequences([[1] * n for n in (3, 1, 7, 2)])
    x = torch.randn(batch.num_tokens, 5)
    bounds = batch.cu_seqlens.tolist()
    expected = torch.stack([ref(x[s:e]) for s, e in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(pool(x, batch, mode), expected)


def test_unknown_mode():
    batch = PackedBatch.from_sequences([[1, 2]])
    with pytest.raises(ValueError, match="unknown pooling mode 'median'"):
        pool(torch.randn(2, 3), batch, "median")
