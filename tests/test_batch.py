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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int32])
def test_mask_of_zeros_and_ones_in_any_dtype_is_accepted(dtype):
    ids = torch.arange(6, dtype=torch.int32).view(2, 3)  # int32 ids: packed as int64 like the rest
    b = PackedBatch.from_padded(ids, torch.tensor([[1, 1, 0], [0, 1, 1]]).to(dtype), ids % 2)
    assert b.input_ids.tolist() == [0, 1, 4, 5] and b.cu_seqlens.tolist() == [0, 2, 4]
    assert b.token_type_ids.tolist() == [0, 1, 0, 1] and b.position_ids.tolist() == [0, 1, 0, 1]
    assert b.pad_index.tolist() == [0, 1, 4, 5] and b.host.lengths == (2, 2)
    assert [t.dtype for t in (b.input_ids, b.token_type_ids, b.position_ids, b.pad_index, b.cu_seqlens)] == \
        [torch.int64] * 4 + [torch.int32]


def test_a_bf16_mask_with_a_half_is_a_value_error():
    with pytest.raises(ValueError, match=r"only 0 and 1.*0\.5"):
        PackedBatch.from_padded(torch.ones(1, 3, dtype=torch.long), torch.tensor([[1.0, 0.5, 0.0]]).bfloat16())


def _by_hand(lengths, max_seqlen=None, T=None, cu=None, **kw):
    T = sum(lengths) if T is None else T
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32) if cu is None else cu
    ids = torch.arange(T) % 50 + 3
    return PackedBatch(ids, torch.zeros(T, dtype=torch.long), torch.zeros(T, dtype=torch.long), cu,
                       max(lengths) if max_seqlen is None else max_seqlen, **kw)


@pytest.mark.parametrize("build, message", [
    (lambda: _by_hand([3, 4], T=9), r"from 0 to T = 9"),                     # cu_seqlens[-1] != T
    (lambda: _by_hand([3, 4], max_seqlen=3), r"longest length in cu_seqlens, 4"),  # too small: the Triton grid
    (lambda: _by_hand([3, 4], max_seqlen=5), r"longest length in cu_seqlens, 4"),  # would skip or overrun
    (lambda: _by_hand([3, 4], max_seqlen=torch.tensor(4)), r"host int"),
    (lambda: _by_hand([3, 0, 4]), r"sequences \[1\] have length \[0\]"),
    (lambda: _by_hand([5, -2, 4], T=7), r"sequences \[1\] have length \[-2\]"),
    (lambda: _by_hand([3, 4], cu=torch.tensor([1, 4, 8], dtype=torch.int32), T=8), r"from 0"),
    (lambda: _by_hand([3, 4], cu=torch.tensor([0, 3, 7])), r"int32"),
    (lambda: _by_hand([3, 4], cu=torch.tensor([7], dtype=torch.int32)), r"B \+ 1 >= 2"),
    (lambda: PackedBatch(torch.arange(4), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                         torch.tensor([0, 4], dtype=torch.int32), 4), r"token_type_ids must be .* T = 4"),
    (lambda: _by_hand([3, 4], pad_index=torch.arange(7)), r"pad_index and padded_shape"),
    (lambda: _by_hand([3, 4], pad_index=torch.arange(7), padded_shape=(2, 3)), r"S >= 4"),
])
def test_hand_built_batch_is_checked(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_hand_built_batch_runs_like_a_packed_one():
    import padfree
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    enc = padfree.from_pretrained(BertModel(BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                                                       intermediate_size=40, vocab_size=60)))
    seqs = [[5, 6, 7], [8], [9, 10, 11], [12, 13, 14]]
    packed = PackedBatch.from_sequences(seqs)
    hand = PackedBatch(packed.input_ids.clone(), packed.token_type_ids.clone(), packed.position_ids.clone(),
                       packed.cu_seqlens.clone(), 3)
    assert hand.runs == packed.runs == ((0, 1, 3), (3, 1, 1), (4, 2, 3))
    assert torch.equal(enc.forward_packed(hand), enc.forward_packed(packed))


def test_constructors_and_to_carry_the_host_layout_without_rereading(monkeypatch):
    b = PackedBatch.from_sequences([[1, 2, 3], [4], [5]])
    a = PackedBatch.from_padded(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert b.runs == ((0, 1, 3), (3, 2, 1)) and a.runs == ((0, 1, 2), (2, 1, 3))
    monkeypatch.setattr(PackedBatch, "validate", lambda self: pytest.fail("re-validated a packed batch"))
    assert b.to("cpu").host is b.host
    PackedBatch.from_sequences([[1, 2]])
    PackedBatch.from_padded(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2))
