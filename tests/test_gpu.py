"""End to end on a CUDA GPU (skipped without one): BERT-base, DeBERTa-v3-base and a ModernBERT-base-shaped model
parity with transformers in fp16/bf16 through the Triton backend (DeBERTa's relative terms, ModernBERT's rotary
and sliding window inside the attention kernel), and CUDA-graph replay equal to the eager forward."""
import pytest
import torch

import padfree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def bert_base(seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    return BertModel(BertConfig(attn_implementation="eager")).eval().cuda()  # 12 layers, 768, 12 heads


def deberta_v3_base(seed=0):
    from transformers import DebertaV2Config, DebertaV2Model
    torch.manual_seed(seed)
    cfg = DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=256,
                          max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                          position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, vocab_size=128100)
    return DebertaV2Model(cfg).eval().cuda()  # the deberta-v3-base shape: 12 layers, 768, 12 heads


def modernbert_base(seed=0, layers=4):
    """ModernBERT-base's widths (768, 12 heads of 64, GeGLU 1152) and 128-token local attention (window 64), with
    fewer layers: a global and local layers, sequences longer than the window."""
    from transformers import ModernBertConfig, ModernBertModel
    torch.manual_seed(seed)
    cfg = ModernBertConfig(num_hidden_layers=layers, pad_token_id=0)
    return ModernBertModel._from_config(cfg, attn_implementation="sdpa").eval().cuda()


FAMILIES = {"bert": bert_base, "deberta-v3": deberta_v3_base, "modernbert": modernbert_base}


def ragged(lengths, vocab=30522, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.randint(1000, vocab, (len(lengths), S), generator=g)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["bert", "deberta-v3", "modernbert"])
def test_base_parity_half(family, dtype):
    hf = FAMILIES[family]()
    ids, mask = ragged([1, 512, 77, 300, 128, 5, 64, 200])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        hf_half = hf.to(dtype)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    enc = padfree.from_pretrained(hf.float(), dtype=dtype, device="cuda")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}  # fused ops: F.linear + kernel
    out = enc(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    real = mask.bool()
    ours, theirs = (out[real] - ref[real]).abs().max().item(), (hf_half[real] - ref[real]).abs().max().item()
    assert ours <= 2 * theirs + 0.02, (ours, theirs)


def test_bert_base_parity_fp32():
    hf = bert_base()
    ids, mask = ragged([1, 512, 77, 300])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    enc = padfree.from_pretrained(hf, device="cuda")
    out = enc(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    # fp32 stays IEEE fp32 on the GPU: the attention kernel's dots use input_precision="ieee" and torch's fp32
    # matmuls do not use tf32 by default; only the reduction order differs from the CPU reference
    assert (out[real] - ref[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["bert", "deberta-v3", "modernbert"])
def test_cuda_graph_replay_matches_eager(family):
    from padfree.cuda_graphs import CudaGraphEncoder
    enc = padfree.from_pretrained(FAMILIES[family](), dtype=torch.float16, device="cuda")
    runner = CudaGraphEncoder(enc, buckets=(64, 256), max_batch=8)
    for lengths in ([3, 17, 1], [60], [100, 90, 50], [7] * 8, [300]):
        batch = padfree.PackedBatch.from_sequences(
            [list(range(1000, 1000 + n)) for n in lengths], device="cuda")
        torch.testing.assert_close(runner.forward_packed(batch), enc.forward_packed(batch), atol=2e-3, rtol=0)
