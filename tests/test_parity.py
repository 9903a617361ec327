"""End-to-end parity with Hugging Face transformers on random-weight BERT and RoBERTa models."""
import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

import padfree

SHAPES = [  # (hidden, heads, layers, max_positions)
    (64, 4, 1, 40),
    (384, 6, 3, 48),
    (768, 12, 2, 64),
]


def hf_model(family, hidden, heads, layers, max_pos, seed=0):
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                  intermediate_size=4 * hidden, vocab_size=211, attn_implementation="eager")
    if family == "bert":
        return BertModel(BertConfig(max_position_embeddings=max_pos, type_vocab_size=3, **common)).eval()
    # RoBERTa's table has padding_idx + 1 = 2 extra rows: max_pos usable positions
    return RobertaModel(RobertaConfig(max_position_embeddings=max_pos + 2, pad_token_id=1, **common)).eval()


def make_inputs(lengths, S, side, vocab, n_types, pad_id, seed=0):
    """Padded ids/mask/types plus the per-sequence position ids padfree uses (restart at the first real token)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.full((B, S), pad_id)
    mask = torch.zeros(B, S, dtype=torch.long)
    types = torch.zeros(B, S, dtype=torch.long)
    pos = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(S - n, S)
        ids[b, cols] = torch.randint(2, vocab, (n,), generator=g)  # real tokens never equal the pad id
        mask[b, cols] = 1
        types[b, cols] = torch.randint(0, n_types, (n,), generator=g)
        pos[b, cols] = torch.arange(n)
    return ids, mask, types, pos


def batches(max_pos):
    """Mixed lengths with a length-1 and a full-length sequence, and a batch of one."""
    return [[1, max_pos, 7, max_pos // 2, 3], [max_pos // 3]]


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}x{s[1]}L{s[2]}")
@pytest.mark.parametrize("side", ["right", "left"])
def test_fp32_parity(family, shape, side):
    hidden, heads, layers, max_pos = shape
    hf = hf_model(family, hidden, heads, layers, max_pos)
    enc = padfree.from_pretrained(hf)
    offset = 0 if family == "bert" else 2
    n_types = 3 if family == "bert" else 1
    for lengths in batches(max_pos):
        ids, mask, types, pos = make_inputs(lengths, max(lengths), side, 211, n_types, hf.config.pad_token_id)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos + offset)
        out = enc(input_ids=ids, attention_mask=mask, token_type_ids=types)
        real = mask.bool()
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        assert (out.last_hidden_state[real] - ref.last_hidden_state[real]).abs().max() <= 1e-4
        assert torch.all(out.last_hidden_state[~real] == 0)
        # HF pools column 0, a pad under left padding; padfree pools each sequence's first real token (its CLS)
        first = mask.argmax(dim=1)
        with torch.no_grad():
            ref_pool = torch.tanh(hf.pooler.dense(ref.last_hidden_state[torch.arange(len(lengths)), first]))
        assert (out.pooler_output - ref_pool).abs().max() <= 1e-4
        if side == "right":
            assert (out.pooler_output - ref.pooler_output).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_default_positions_match_hf_for_right_padding(family):
    """Without explicit position ids HF numbers right-padded tokens as padfree does (RoBERTa: from the pad id)."""
    hf = hf_model(family, 64, 4, 2, 40)
    enc = padfree.from_pretrained(hf)
    ids, mask, _, _ = make_inputs([5, 40, 1], 40, "right", 211, 1, hf.config.pad_token_id, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    out = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-4


# bf16 weights and activations (LayerNorm and softmax statistics in fp32), against the fp32 HF output.
# Measured on these shapes: padfree bf16 max abs error 0.046-0.054, HF's own bf16 0.044-0.055 (ratio <= 1.13).
# Held: <= 2x HF's bf16 error + 0.02.
@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("shape", SHAPES[1:], ids=lambda s: f"h{s[0]}x{s[1]}L{s[2]}")
def test_bf16_tolerance(family, shape):
    hidden, heads, layers, max_pos = shape
    hf = hf_model(family, hidden, heads, layers, max_pos)
    enc = padfree.from_pretrained(hf, dtype=torch.bfloat16)
    ids, mask, types, pos = make_inputs(batches(max_pos)[0], max_pos, "right", 211, 1, hf.config.pad_token_id)
    offset = 0 if family == "bert" else 2
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=pos + offset)
    with torch.no_grad():
        ref = hf(**kw).last_hidden_state
        hf_bf16 = hf.to(torch.bfloat16)(**kw).last_hidden_state.float()
    out = enc(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert out.dtype == torch.bfloat16
    out = out.float()
    real = mask.bool()
    ours = (out[real] - ref[real]).abs().max().item()
    theirs = (hf_bf16[real] - ref[real]).abs().max().item()
    assert ours <= 2 * theirs + 0.02, (ours, theirs)


def test_load_from_directory(tmp_path):
    hf = hf_model("bert", 64, 4, 2, 40)
    hf.save_pretrained(tmp_path)
    enc = padfree.from_pretrained(tmp_path)
    ids, mask, types, _ = make_inputs([4, 9], 9, "right", 211, 3, 0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    out = enc(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert (out - ref)[mask.bool()].abs().max() <= 1e-4


def test_forward_packed_equals_padded_call():
    hf = hf_model("bert", 64, 4, 2, 40)
    enc = padfree.from_pretrained(hf)
    seqs = [[5, 6, 7], [9], [10, 11, 12, 13, 14]]
    batch = padfree.PackedBatch.from_sequences(seqs)
    h = enc.forward_packed(batch)
    assert h.shape == (9, 64)
    ids, mask, _, _ = make_inputs([3, 1, 5], 5, "right", 211, 1, 0)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
    torch.testing.assert_close(batch.unpack(h), enc(input_ids=ids, attention_mask=mask).last_hidden_state)
