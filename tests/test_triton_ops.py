"""The Triton kernels against their fp32 references.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``) at small sizes; on a CUDA
machine the same tests run compiled on the GPU at larger sizes.

Tolerance rule (as in flash-attention's tests): with both errors measured as the max absolute difference from
the op's fp32 reference evaluated on fp32 upcasts of the same inputs,
    error(kernel) <= 2 * error(plain PyTorch in the kernel's dtype) + ATOL[dtype].
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before the kernels are defined
triton = pytest.importorskip("triton")

from padfree.ops import torch_backend  # noqa: E402
from padfree.ops.activations import ACTIVATIONS, apply_activation  # noqa: E402
from padfree.ops.reference import (add_bias_residual_layer_norm_ref, bias_act_ref,  # noqa: E402
                                   embed_layer_norm_ref, gated_act_ref, rms_norm_ref, varlen_attention_ref)
from padfree.ops.relative import RelativeScores, relative_score_terms  # noqa: E402
from padfree.ops.rotary import apply_rotary, rotary_tables  # noqa: E402
from padfree.ops.triton_activation import bias_act, gated_act  # noqa: E402
from padfree.ops.triton_attention import (HEAD_DIMS, launch_varlen_attention,  # noqa: E402
                                          varlen_attention)
from padfree.ops.triton_embedding import embed_layer_norm  # noqa: E402
from padfree.ops.triton_layer_norm import add_bias_residual_layer_norm, rms_norm  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
# Triton 3.6's CPU interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest: one more bf16 ulp.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def assert_close_to_ref(out, ref32, plain, dtype, what=""):
    """The tolerance rule above; ``ref32`` is the fp32 reference, ``plain`` plain PyTorch in ``dtype``."""
    assert out.dtype == dtype and out.shape == ref32.shape, (out.dtype, out.shape, ref32.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = (out.float() - ref32.float()).abs().max().item()
    base = (plain.float() - ref32.float()).abs().max().item()
    atol = ATOL[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        atol += ref32.float().abs().max().item() * 2 ** -7
    assert err <= 2 * base + atol, f"{what}: kernel error {err:.3g} > 2 x plain {base:.3g} + {atol:.3g}"


def cu_seqlens_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)


def ragged_lengths(max_len, n, gen):
    """``n`` random lengths in [1, max_len], plus a length-1 sequence and a full-length one."""
    rand = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    return [1] + rand[: n // 2] + [max_len] + rand[n // 2:]


# ------------------------------------------------------------------------------------------------ attention
def plain_attention(qkv, cu_seqlens, num_heads, qkv_bias, scale, rel=None, max_seqlen=0, rotary=None, window=None):
    """Per-sequence ``softmax(q k^T * scale + rel terms) v`` in qkv's own dtype (what plain PyTorch code
    computes; the relative terms are rounded to that dtype as an additive mask; Q and K rotated by the torch
    backend's ``apply_rotary``, rounded to the dtype; the window as a band mask)."""
    T, three_h = qkv.shape
    d = three_h // 3 // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    x = qkv if qkv_bias is None else qkv + qkv_bias
    if rotary is not None:
        x = apply_rotary(x, *rotary, num_heads)
    x = x.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[s:e, i].transpose(0, 1) for i in range(3))  # [heads, L, d]
        logits = (q @ k.transpose(1, 2)) * scale
        if rel is not None:
            logits = logits + relative_score_terms(q[None], k[None], rel, max_seqlen, scale)[0].to(qkv.dtype)
        if window is not None:
            pos = torch.arange(e - s, device=qkv.device)
            logits = logits.masked_fill((pos[:, None] - pos[None, :]).abs() > window, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[s:e] = (p @ v).transpose(0, 1)
    return out.reshape(T, -1)


def check_attention(lengths, num_heads, head_dim, dtype, with_bias=True, scale=None, config=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu = cu_seqlens_of(lengths)
    T, H = sum(lengths), num_heads * head_dim
    qkv = torch.randn(T, 3 * H, generator=gen).to(DEVICE, dtype)
    bias = (0.5 * torch.randn(3 * H, generator=gen)).to(DEVICE, dtype) if with_bias else None
    max_len = max(lengths)
    if config is None:
        out = varlen_attention(qkv, cu, max_len, num_heads, bias, scale)
    else:
        out = launch_varlen_attention(qkv, cu, max_len, num_heads, bias, scale, **config)
    ref = varlen_attention_ref(qkv.float(), cu, max_len, num_heads, None if bias is None else bias.float(), scale)
    plain = plain_attention(qkv, cu, num_heads, bias, scale)
    assert_close_to_ref(out, ref, plain, dtype, f"attention d={head_dim} {dtype} {config}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_attention_head_sizes(head_dim, dtype):
    """Every head size (the padded ones 80 and 96 too) and dtype, on a small ragged batch."""
    if GPU:  # one batch for the streaming path, one for the single-tile path
        for max_len in (300, 50):
            lengths = ragged_lengths(max_len, 6, torch.Generator().manual_seed(head_dim))
            check_attention(lengths, 4, head_dim, dtype, seed=head_dim)
    else:
        check_attention([1, 5, 20, 3], 2, head_dim, dtype, seed=head_dim)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_long_path(dtype):
    """The streaming (online-softmax) path: several key blocks, a partial last block, a zero-length sequence."""
    if GPU:
        lengths = ragged_lengths(700, 10, torch.Generator().manual_seed(1)) + [0]
        check_attention(lengths, 12, 64, dtype)
    else:
        lengths = [1, 33, 48, 0, 7, 48]  # interpreter config: 16x16 tiles
        check_attention(lengths, 2, 32, dtype)
        check_attention(lengths, 2, 32, dtype, with_bias=False, scale=0.3,
                        config=dict(block_m=32, block_n=16, single_tile=False, num_warps=4, num_stages=1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_single_tile_path(dtype):
    """The short-sequence path: all keys of a sequence in one tile."""
    if GPU:
        check_attention(ragged_lengths(64, 40, torch.Generator().manual_seed(2)), 12, 64, dtype)
        lengths = ragged_lengths(128, 8, torch.Generator().manual_seed(3))
        check_attention(lengths, 12, 64, dtype, config=dict(block_m=32, block_n=128, single_tile=True,
                                                           num_warps=4, num_stages=1))
    else:
        lengths = [1, 30, 12, 30]
        check_attention(lengths, 2, 32, dtype)
        check_attention([1, 40, 0, 17], 2, 32, dtype, scale=0.2,
                        config=dict(block_m=16, block_n=64, single_tile=True, num_warps=4, num_stages=1))


def random_rel(kind, heads, head_dim, max_seqlen, dtype, rows=11, seed=0):
    """Relative terms of one kind: "bias" (MPNet), "disentangled" (DeBERTa c2p + p2c) or "all". The index is
    random, so distance i - j and j - i read different rows (a swapped c2p/p2c or sign cannot pass)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, rows, (2 * max_seqlen - 1,), generator=g).to(DEVICE)
    table = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype)  # noqa: E731
    bias = table(heads, rows) if kind in ("bias", "all") else None
    pos_key = table(heads, rows, head_dim) if kind in ("disentangled", "all") else None
    pos_query = table(heads, rows, head_dim) if kind in ("disentangled", "all") else None
    return RelativeScores(index, bias=bias, pos_key=pos_key, pos_query=pos_query)


def to_fp32(rel):
    up = lambda t: None if t is None else t.float()  # noqa: E731
    return RelativeScores(rel.index, bias=up(rel.bias), pos_key=up(rel.pos_key), pos_query=up(rel.pos_query))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bias", "disentangled", "all"])
def test_attention_relative_terms(kind, dtype):
    """MPNet's bias and DeBERTa's c2p/p2c inside the kernel, on the single-tile and the streaming path."""
    heads, head_dim = (12, 64) if GPU else (2, 32)
    cases = ([ragged_lengths(60, 20, torch.Generator().manual_seed(4)),
              ragged_lengths(400, 8, torch.Generator().manual_seed(5)) + [0]] if GPU
             else [[1, 30, 12, 30], [1, 33, 48, 0, 7, 48]])
    for lengths in cases:
        gen = torch.Generator().manual_seed(len(lengths))
        cu, max_len = cu_seqlens_of(lengths), max(lengths)
        H = heads * head_dim
        qkv = torch.randn(sum(lengths), 3 * H, generator=gen).to(DEVICE, dtype)
        bias = (0.5 * torch.randn(3 * H, generator=gen)).to(DEVICE, dtype)
        rel = random_rel(kind, heads, head_dim, max_len, dtype)
        out = varlen_attention(qkv, cu, max_len, heads, bias, 0.2, rel=rel)
        ref = varlen_attention_ref(qkv.float(), cu, max_len, heads, bias.float(), 0.2, to_fp32(rel))
        plain = plain_attention(qkv, cu, heads, bias, 0.2, rel, max_len)
        assert_close_to_ref(out, ref, plain, dtype, f"relative {kind} max {max_len}")


def test_attention_relative_terms_checked():
    qkv = torch.zeros(4, 3 * 2 * 32, device=DEVICE)
    cu = cu_seqlens_of([4])
    rel = random_rel("all", 2, 32, 4, torch.float32)
    with pytest.raises(ValueError, match="rel.index"):
        varlen_attention(qkv, cu, 5, 2, rel=rel)  # index built for another max_seqlen
    with pytest.raises(ValueError, match="same R rows"):
        varlen_attention(qkv, cu, 4, 2, rel=RelativeScores(rel.index, bias=rel.bias, pos_key=rel.pos_key[:, :3]))


def test_attention_rejects_unsupported():
    qkv = torch.zeros(4, 3 * 2 * 48, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head size 48"):
        varlen_attention(qkv, cu_seqlens_of([4]), 4, 2)
    qkv = torch.zeros(4, 3 * 2 * 64, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(qkv, cu_seqlens_of([4]).long(), 4, 2)
    with pytest.raises(ValueError, match="dtype"):
        varlen_attention(qkv.double(), cu_seqlens_of([4]), 4, 2)
    with pytest.raises(ValueError, match="host int"):
        varlen_attention(qkv, cu_seqlens_of([4]), torch.tensor(4), 2)


@needs_gpu
def test_attention_cuda_graph():
    """No host synchronisation: a forward is captured in a CUDA graph and replayed on new inputs."""
    lengths = [3, 130, 77, 1]
    cu = cu_seqlens_of(lengths)
    H, heads = 768, 12
    qkv = torch.randn(sum(lengths), 3 * H, device="cuda", dtype=torch.float16)
    bias = torch.randn(3 * H, device="cuda", dtype=torch.float16)
    varlen_attention(qkv, cu, max(lengths), heads, bias)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = varlen_attention(qkv, cu, max(lengths), heads, bias)
    qkv.copy_(torch.randn_like(qkv))
    graph.replay()
    torch.cuda.synchronize()
    ref = varlen_attention_ref(qkv.float(), cu, max(lengths), heads, bias.float())
    assert_close_to_ref(out, ref, plain_attention(qkv, cu, heads, bias, None), torch.float16, "graph")


@pytest.mark.parametrize("family,shape", [("bert", 1), ("mpnet", 1), ("deberta-v2", 0), ("deberta-v2", 1)])
def test_encoder_on_triton_backend(family, shape, triton_everywhere):
    """Whole models through the Triton backend (every op a kernel, relative terms in the attention kernel)
    against Hugging Face, fp32: the wiring between encoder and kernels, not only each kernel."""
    import padfree
    from family_zoo import LENGTHS, batch, make, max_diff
    model = make(family, shape, **({"num_attention_heads": 3} if shape == 1 else {}))  # head size 16
    enc = padfree.from_pretrained(model, device=DEVICE, backend="triton")
    assert set(enc.kernels.names.values()) == {"triton", "composed(triton)"}  # fused ops: F.linear + kernel
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    out = enc(ids.to(DEVICE), mask.to(DEVICE), None if types is None else types.to(DEVICE)).last_hidden_state
    assert max_diff(out.cpu(), ref, mask) <= 1e-4


@needs_gpu
def test_registry_selects_triton():
    from padfree.ops import select
    name, fn = select("varlen_attention", "cuda", torch.float16, 64)
    assert name == "triton" and fn is varlen_attention


# ------------------------------------------------------------------------------------------------ rotary, window
def check_rotary_window(lengths, heads, head_dim, dtype, rotary=True, window=None, with_bias=True, config=None,
                        seed=0, theta=10000.0):
    """Rotary and/or sliding window against the fp32 reference; positions restart at each sequence (as
    ``PackedBatch.position_ids``), the bias is added before the rotation (a K bias matters under rotary)."""
    gen = torch.Generator().manual_seed(seed)
    cu, max_len = cu_seqlens_of(lengths), max(lengths)
    T, H = sum(lengths), heads * head_dim
    qkv = torch.randn(T, 3 * H, generator=gen).to(DEVICE, dtype)
    bias = (torch.randn(3 * H, generator=gen)).to(DEVICE, dtype) if with_bias else None
    pos = torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)
    tables = rotary_tables(pos, head_dim, theta) if rotary else None
    kw = dict(rotary=tables, window=window)
    if config is None:
        out = varlen_attention(qkv, cu, max_len, heads, bias, None, **kw)
    else:
        out = launch_varlen_attention(qkv, cu, max_len, heads, bias, None, **config, **kw)
    ref = varlen_attention_ref(qkv.float(), cu, max_len, heads, None if bias is None else bias.float(), None, **kw)
    plain = plain_attention(qkv, cu, heads, bias, None, **kw)
    assert_close_to_ref(out, ref, plain, dtype, f"rotary={rotary} window={window} d={head_dim} {config}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_rotary(dtype):
    """Q and K rotated inside the kernel, with a QKV bias (the K bias is added, then rotated): the single-tile and
    the streaming path, a padded head size (80: the pairs (m, m + 40) inside a 128-wide tile), length 1."""
    if GPU:
        for max_len in (60, 500):
            for head_dim in (64, 80, 128):
                check_rotary_window(ragged_lengths(max_len, 8, torch.Generator().manual_seed(max_len)), 4,
                                    head_dim, dtype)
    else:
        check_rotary_window([1, 30, 12, 30], 2, 32, dtype)  # single tile
        check_rotary_window([1, 33, 48, 0, 7], 2, 32, dtype, seed=1)  # streaming, a zero-length sequence
        check_rotary_window([1, 5, 20], 1, 80, dtype, seed=2)
        check_rotary_window([2, 40], 2, 16, dtype, with_bias=False, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_sliding_window(dtype):
    """The band ``|i - j| <= window`` alone and with rotary: windows smaller and larger than a key block, lengths
    past the window and within it, length 1, window 0 (each token sees itself only)."""
    if GPU:
        lengths = ragged_lengths(700, 8, torch.Generator().manual_seed(6))
        for window in (64, 100, 256):
            check_rotary_window(lengths, 4, 64, dtype, rotary=False, window=window)
            check_rotary_window(lengths, 4, 64, dtype, window=window, seed=window)
        check_rotary_window(ragged_lengths(60, 20, torch.Generator().manual_seed(7)), 4, 64, dtype, window=10)
    else:
        lengths = [1, 50, 7, 0, 36, 12]  # streaming path: 16x16 tiles
        check_rotary_window(lengths, 2, 16, dtype, rotary=False, window=5)
        check_rotary_window(lengths, 2, 16, dtype, window=21, seed=1)  # wider than a block
        check_rotary_window(lengths, 1, 16, dtype, window=0, seed=2)
        # a band edge on a block edge: query block m_lo's first key m_lo - 16, or last key m_lo + 15 + 1 = the
        # first key of a block (a key loop bound off by one skips it)
        check_rotary_window(lengths, 1, 16, dtype, rotary=False, window=16, seed=5)
        check_rotary_window(lengths, 1, 16, dtype, rotary=False, window=1, seed=6)
        check_rotary_window([1, 30, 3, 25], 2, 16, dtype, window=4, seed=3)  # single tile
        check_rotary_window([3, 50, 1], 1, 32, dtype, window=6, seed=4,
                            config=dict(block_m=32, block_n=16, single_tile=False, num_warps=4, num_stages=1))


def test_attention_window_visits_only_its_band():
    """Local layers cost O(T * window): a query block reads only the key blocks its band meets. NaN values in the
    first and last key blocks poison every query block that reads them (0 * NaN), so the middle one (queries
    32..47, band 29..50: key blocks 1..3) must stay finite."""
    L, window, cfg = 80, 3, dict(block_m=16, block_n=16, single_tile=False, num_warps=4, num_stages=1)
    qkv = torch.randn(L, 3 * 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    qkv[:16, 64:] = qkv[64:, 64:] = float("nan")  # V of keys 0..15 and 64..79
    out = launch_varlen_attention(qkv, cu_seqlens_of([L]), L, 1, window=window, **cfg)
    assert torch.isfinite(out[32:48]).all()
    assert not torch.isfinite(out[:16]).any() and not torch.isfinite(out[64:]).any()  # the NaNs do reach


def test_attention_window_with_rel_refused():
    qkv = torch.zeros(4, 3 * 2 * 32, device=DEVICE)
    with pytest.raises(ValueError, match="sliding window with relative"):
        varlen_attention(qkv, cu_seqlens_of([4]), 4, 2, rel=random_rel("bias", 2, 32, 4, torch.float32), window=1)
    with pytest.raises(ValueError, match="rotary cos"):
        varlen_attention(qkv, cu_seqlens_of([4]), 4, 2, rotary=(torch.zeros(4, 8), torch.zeros(4, 16)))


# ------------------------------------------------------------------------------------------------ LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 100] if not GPU else [768, 1000, 1024, 4096])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("ln_bias", [True, False])
def test_add_bias_residual_layer_norm(hidden, dtype, with_bias, ln_bias):
    gen = torch.Generator().manual_seed(hidden)
    T = 37 if not GPU else 3001
    x, res = ((2 * torch.randn(T, hidden, generator=gen) + 1).to(DEVICE, dtype) for _ in range(2))
    bias = torch.randn(hidden, generator=gen).to(DEVICE, dtype) if with_bias else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    b = (0.5 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype) if ln_bias else None  # None: ModernBERT
    out = add_bias_residual_layer_norm(x, bias, res, w, b, 1e-12)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref = add_bias_residual_layer_norm_ref(x.float(), up(bias), res.float(), w.float(), up(b), 1e-12)
    plain = torch_backend.add_bias_residual_layer_norm(x, bias, res, w, b, 1e-12)
    assert_close_to_ref(out, ref, plain, dtype, f"layer norm H={hidden}")


# ------------------------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 100] if not GPU else [768, 1000, 4096])
def test_rms_norm(hidden, dtype):
    gen = torch.Generator().manual_seed(hidden)
    T = 37 if not GPU else 3001
    x = (2 * torch.randn(T, hidden, generator=gen) + 1).to(DEVICE, dtype)
    x[0] = 0  # an all-zero row: eps alone under the root
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    out = rms_norm(x, w, 1e-6)
    ref = rms_norm_ref(x.float(), w.float(), 1e-6)
    plain = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w  # every step in the dtype
    assert_close_to_ref(out, ref, plain, dtype, f"rms norm H={hidden}")


# ------------------------------------------------------------------------------------------------ bias + act
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: exp(+large) = inf
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_bias_act(activation, dtype):
    gen = torch.Generator().manual_seed(7)
    T, F = (19, 1100) if not GPU else (2001, 3072)
    x = (3 * torch.randn(T, F, generator=gen)).to(DEVICE, dtype)
    x[0, :8] = torch.tensor([-60.0, -20.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 20.0], dtype=dtype)  # tails of exp/erf
    bias = torch.randn(F, generator=gen).to(DEVICE, dtype)
    bias[:8] = 0
    for b in (bias, None):
        out = bias_act(x, b, activation)
        ref = bias_act_ref(x.float(), None if b is None else b.float(), activation)
        plain = torch_backend.bias_act(x, b, activation)
        assert_close_to_ref(out, ref, plain, dtype, f"{activation} bias={b is not None}")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_gated_act(activation, dtype):
    """``act(input) * gate`` of ``x + bias = [input | gate]`` (GeGLU: gelu, SwiGLU: silu), F not a power of 2."""
    gen = torch.Generator().manual_seed(9)
    T, F = (19, 550) if not GPU else (2001, 3072)
    x = (3 * torch.randn(T, 2 * F, generator=gen)).to(DEVICE, dtype)
    x[0, :8] = torch.tensor([-60.0, -20.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 20.0], dtype=dtype)  # tails of exp/erf
    bias = torch.randn(2 * F, generator=gen).to(DEVICE, dtype)
    bias[:8] = 0
    for b in (bias, None):
        out = gated_act(x, b, activation)
        ref = gated_act_ref(x.float(), None if b is None else b.float(), activation)
        plain = torch_backend.gated_act(x, b, activation)
        assert_close_to_ref(out, ref, plain, dtype, f"gated {activation} bias={b is not None}")
    with pytest.raises(ValueError, match="odd width"):
        gated_act(x[:, 1:].contiguous(), None, activation)


def test_bias_act_rejects_unknown():
    with pytest.raises(ValueError, match="activation"):
        bias_act(torch.zeros(2, 4, device=DEVICE), None, "gelu_new")  # HF name: canonicalise first


def test_activation_formulas_match_pytorch():
    """The kernel's one-exp forms equal PyTorch's definitions (checked in fp64, no kernel involved)."""
    x = torch.linspace(-30, 30, 10001, dtype=torch.float64)
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    assert torch.allclose(x / (1 + torch.exp(-2 * u)), apply_activation(x, "gelu_tanh"), atol=1e-12)
    assert torch.allclose(x / (1 + torch.exp(-1.702 * x)), apply_activation(x, "quick_gelu"), atol=1e-12)


# ------------------------------------------------------------------------------------------------ embedding
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["all", "no_type", "word_only", "word_only_no_bias"])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_embed_layer_norm(tables, dtype, id_dtype):
    gen = torch.Generator().manual_seed(3)
    V, P, E, T = (50, 16, 96, 23) if not GPU else (30522, 512, 768, 4001)
    word = torch.randn(V, E, generator=gen).to(DEVICE, dtype)
    pos = torch.randn(P, E, generator=gen).to(DEVICE, dtype) if not tables.startswith("word_only") else None
    typ = torch.randn(2, E, generator=gen).to(DEVICE, dtype) if tables == "all" else None
    w = (1 + 0.1 * torch.randn(E, generator=gen)).to(DEVICE, dtype)
    b = (0.5 + 0.1 * torch.randn(E, generator=gen)).to(DEVICE, dtype) if tables != "word_only_no_bias" else None
    ids = torch.randint(0, V, (T,), generator=gen).to(DEVICE, id_dtype)
    ids[0], ids[-1] = 0, V - 1
    pos_ids = torch.randint(0, P, (T,), generator=gen).to(DEVICE, id_dtype) if pos is not None else None
    type_ids = torch.randint(0, 2, (T,), generator=gen).to(DEVICE, id_dtype) if typ is not None else None
    out = embed_layer_norm(ids, pos_ids, type_ids, word, pos, typ, w, b, 1e-12)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref = embed_layer_norm_ref(ids, pos_ids, type_ids, word.float(), up(pos), up(typ), w.float(), up(b), 1e-12)
    plain = torch_backend.embed_layer_norm(ids, pos_ids, type_ids, word, pos, typ, w, b, 1e-12)
    assert_close_to_ref(out, ref, plain, dtype, f"embedding {tables}")


def test_backend_exports_match_torch_backend():
    import inspect

    from padfree.ops import triton_backend
    from padfree.ops.registry import BACKENDS
    triton_entry = next(b for b in BACKENDS if b.name == "triton")
    assert triton_entry.ops == frozenset(triton_backend.__all__)
    for name in triton_backend.__all__:
        # a capability the registry declares missing (rel=: relative-position score terms; rotary=, window=:
        # the features "rotary", "sliding_window") is the only allowed difference; the registry then never
        # routes a call that needs it to this backend
        missing = ()
        if name == "varlen_attention":
            missing = tuple(arg for arg, has in (("rel", triton_entry.relative_scores),
                                                 ("rotary", "rotary" in triton_entry.features),
                                                 ("window", "sliding_window" in triton_entry.features)) if not has)
        expected = [p for p in inspect.signature(getattr(torch_backend, name)).parameters if p not in missing]
        assert list(inspect.signature(getattr(triton_backend, name)).parameters) == expected, name
