"""PackedBatch: packing by prefix sum, every padding side, unpacking with zeros at pads, bad input."""
import pytest
import torch

from padfree import PackedBatch


def padded(lengths, S, side="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, S - n:] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_from_padded_packs_real_tokens_in_order(side):
    lengths, S = [3, 1, 6, 4], 6
    ids, mask = padded(lengths, S, side)
    types = torch.randint(0, 2, ids.shape)
    b = PackedBatch.from_padded(ids, mask, types)
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 10, 14]
    assert isinstance(b.max_seqlen, int) and b.max_seqlen == 6
    assert b.input_ids.tolist() == ids[mask.bool()].tolist()
    assert b.token_type_ids.tolist() == types[mask.bool()].tolist()
    assert b.position_ids.tolist() == [p for n in lengths for p in range(n)]


def test_any_mask_pattern_and_unpack_roundtrip():
    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]])
    b = PackedBatch.from_padded(ids, mask)
    assert b.input_ids.tolist() == [1, 3, 4, 6, 11]
    x = torch.randn(b.num_tokens, 3)
    y = b.unpack(x)
    assert y.shape == (2, 6, 3)
    assert torch.equal(y[mask.bool()], x)
    assert torch.all(y[~mask.bool()] == 0)


def test_from_sequences_and_unpack_right_padded():
    b = PackedBatch.from_sequences([[7, 8, 9], [5], [1, 2]], token_type_ids=[[0, 0, 1], [0], [1, 1]])
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.max_seqlen == 3
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.token_type_ids.tolist() == [0, 0, 1, 0, 1, 1]
    y = b.unpack(torch.arange(6.0)[:, None])
    assert y[..., 0].tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 0]]
    assert b.sequence_index().tolist() == [0, 0, 0, 1, 2, 2]


@pytest.mark.parametrize("make, message", [
    (lambda: PackedBatch.from_padded(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4)), "does not match"),
    (lambda: PackedBatch.from_padded(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [0, 0, 0]])),
     "no real token"),
    (lambda: PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1, 2, 0]])), "only 0 and 1"),
    # a float mask with a value other than 0/1 must not be cast to an int (0.5 -> 0, a silent pad)
    (lambda: PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1.0, 0.5, 0.0]])),
     r"only 0 and 1.*0\.5"),
    (lambda: PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1.0, 1.5, 1.0]])),
     r"only 0 and 1.*1\.5"),
    (lambda: PackedBatch.from_padded(torch.ones(3, dtype=torch.long), torch.ones(3)), "2-D"),
    (lambda: PackedBatch.from_padded(torch.ones(1, 3), torch.ones(1, 3)), "integer"),
    (lambda: PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3),
                                     torch.zeros(1, 2, dtype=torch.long)), "token_type_ids shape"),
    (lambda: PackedBatch.from_sequences([]), "empty batch"),
    (lambda: PackedBatch.from_sequences([[1, 2], []]), "empty"),
    (lambda: PackedBatch.from_sequences([[1, 2]], token_type_ids=[[0]]), "one entry per token"),
])
def test_bad_input_is_a_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_float_mask_of_zeros_and_ones_is_accepted():
    ids = torch.arange(6).view(2, 3)
    b = PackedBatch.from_padded(ids, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))
    assert b.input_ids.tolist() == [0, 1, 4, 5] and b.cu_seqlens.tolist() == [0, 2, 4]
