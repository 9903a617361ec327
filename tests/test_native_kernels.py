"""The native module's kernels (``small_layers.cpp``) called directly, on every instruction set this CPU runs: the
product, attention, activation, residual-add-and-LayerNorm and embedding against float64."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from padfree.ops import native

@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to read the built module")
def test_the_built_products_prefetch():
    """The products' software prefetches are in the built module: GCC once dropped every call of an inlined helper
    holding only prefetches (it judged it free of side effects), and nothing else would have shown it but speed."""
    name, directory = native.build_dir()
    assert native.module() is not None, native.why_not()
    code = subprocess.run(["objdump", "-d", str(directory / f"{name}.so")], capture_output=True, text=True,
                          check=True).stdout
    assert code.count("prefetcht0") >= 12 and code.count("prefetcht1") >= 12  # own blocks ahead; the next block




@pytest.mark.parametrize("rows,cols,depth", [(1, 64, 32), (3, 50, 41), (12, 96, 384), (16, 160, 48), (23, 40, 30),
                                             (25, 101, 64), (64, 37, 7), (128, 70, 24)])
@pytest.mark.parametrize("kernel", ["fp32", "widened", "dot"])
def test_native_product_matches_float64(rows, cols, depth, kernel):
    """The native product (fp32 x and bias; an fp32 weight, a bf16 one widened, or a bf16 one in bf16 dot products
    with x rounded to bf16) against the same product in float64: row counts in one call (up to 12), in two calls
    with the next block prefetched (16 rows, 5 blocks), in calls of at most 11 rows (23, 25, 64, 128) and off an even
    split, column counts off the 32-column block, odd depths (the dot kernel's last pair half empty)."""
    mod = native.module()
    if not (mod.has_avx512_bf16() if kernel == "dot" else mod.has_avx512()):
        pytest.skip(f"this CPU lacks the {kernel} kernel's AVX-512 instructions")
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, depth, generator=g)
    w = torch.randn(cols, depth, generator=g).to(torch.float32 if kernel == "fp32" else torch.bfloat16)
    b = torch.randn(cols, generator=g)
    y = mod.blocks_linear(x, mod.pack_pairs(w) if kernel == "dot" else mod.pack_blocks(w), cols, b)
    x64 = x.to(torch.bfloat16).double() if kernel == "dot" else x.double()
    expected = x64 @ w.double().T + b.double()
    assert y.shape == (rows, cols) and (y.double() - expected).abs().max() <= 1e-4
    if kernel == "dot":  # x handed over already in bf16 (the stack's activation output): the same product
        assert torch.equal(mod.blocks_linear(x.to(torch.bfloat16), mod.pack_pairs(w), cols, b), y)


# (heads, head size, runs as (sequences, length), the longest sequence the native kernel may take): one token, runs
# of equal lengths, sizes off 16 lanes, lengths off 16 keys, the longest sequence the native kernel takes (128), one
# past it and one past the caller's limit (both PyTorch's kernel), an odd head size below 8 with odd lengths (the dot
# kernel's padded pairs)
ATTENTION = [(12, 32, [(1, 8)], 128), (4, 8, [(1, 1), (3, 5), (2, 9)], 128), (12, 64, [(1, 40), (1, 24)], 64),
             (3, 20, [(1, 64)], 64), (2, 80, [(2, 17), (1, 3)], 128), (2, 48, [(1, 100)], 128),
             (2, 16, [(1, 128)], 128), (2, 16, [(1, 129)], 128), (2, 48, [(1, 100)], 64),
             (3, 5, [(1, 11), (2, 6)], 128)]


@pytest.mark.parametrize("heads,size,runs,max_len", ATTENTION)
@pytest.mark.parametrize("dot", [False, True], ids=["fp32", "dot"])
def test_native_attention_matches_float64(heads, size, runs, max_len, dot):
    """Each packed sequence attends to itself only, per head: against softmax(q k^T scale) v in float64. On bf16
    dot products (dot; the native kernel's sequences, PyTorch's fp32 kernel above them) q, k, v and the softmax's
    unnormalised weights are rounded to bf16 first, in the reference too."""
    if dot and not native.module().has_avx512_bf16():
        pytest.skip("this CPU lacks AVX-512 BF16")
    dot_kernel = dot and max(n for _, n in runs) <= max_len  # longer: PyTorch's kernel, in fp32
    r = (lambda v: v.to(torch.bfloat16).double()) if dot_kernel else (lambda v: v)
    hidden, flat, first = heads * size, [], 0
    for count, n in runs:
        flat += [first, count, n]
        first += count * n
    g = torch.Generator().manual_seed(heads * size)
    qkv = torch.randn(first, 3 * hidden, generator=g) * 2
    out = native.module().attention(qkv, flat, heads, 0.3, max_len, dot)
    expected, t = torch.empty(first, hidden, dtype=torch.float64), 0
    for count, n in runs:
        for _ in range(count):
            q, k, v = qkv[t:t + n].double().view(n, 3, heads, size).permute(1, 2, 0, 3)
            scores = r(q) @ r(k).transpose(1, 2) * 0.3
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            context = r(weights) @ r(v) / weights.sum(-1, keepdim=True)
            expected[t:t + n] = context.transpose(0, 1).reshape(n, -1)
            t += n
    # dot: a weight whose fp32 and float64 values round to different bf16 neighbours moves its term by at most 2^-7
    # of it (measured: at most 0.002, against 0.04-0.13 for the reference without the roundings)
    bound = 5e-5 + (2 ** -9 * qkv.abs().max().item() if dot_kernel else 0)
    assert (out.double() - expected).abs().max() <= bound


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_native_activation_matches_float64(activation):
    """The stack's activation in place, on a tensor whose length is off 16 lanes, against its formula in
    float64 (erf GELU, tanh GELU, ReLU, SiLU)."""
    x = torch.linspace(-10, 10, 10007).view(1, -1)
    d = x.double()
    expected = {"gelu": d * 0.5 * (1 + torch.special.erf(d / 2 ** 0.5)),
                "gelu_tanh": d * 0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (d + 0.044715 * d ** 3))),
                "relu": d.clamp(min=0), "silu": d * torch.sigmoid(d)}[activation]
    y = x.clone()
    native.module().activate_(y, activation)
    assert ((y.double() - expected).abs() <= 2e-6 + 1e-6 * expected.abs()).all()


@pytest.mark.parametrize("rows,size", [(3, 100), (1, 384), (200, 768)])
def test_native_add_layer_norm_matches_float64(rows, size):
    """The stack's residual add fused with LayerNorm, in place: on a row size off 16 lanes, one row, and enough rows
    to split over the threads, against LayerNorm of the fp32 sum in float64, within twice ATen's own fp32 error on
    the same rows. The rows' mean is large (50 against a spread of 1.4), where a one-pass variance would lose
    most of its digits."""
    torch.manual_seed(0)
    y, x = torch.randn(rows, size) + 50, torch.randn(rows, size)
    gamma, beta = torch.randn(size), torch.randn(size)
    total = y + x  # the residual add in fp32, as the stack does it
    expected = F.layer_norm(total.double(), (size,), gamma.double(), beta.double(), 1e-12)
    aten = (F.layer_norm(total, (size,), gamma, beta, 1e-12).double() - expected).abs().max()
    out = y.clone()
    native.module().add_layer_norm_(out, x, gamma, beta, 1e-12)
    assert (out.double() - expected).abs().max() <= 2 * aten + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,tables,bias", [(100, 3, True), (384, 1, True), (64, 2, False)])
def test_native_embedding_matches_float64(dtype, size, tables, bias):
    """The embedding in one native pass: word, position and token-type rows (fp32 or bf16 tables; the latter two
    optional) summed and LayerNormed (with or without bias) against float64; fp32 within 2e-6, bf16 within its one
    final rounding. An index past a table is an error naming it, not a read past the table."""
    g = torch.Generator().manual_seed(size)
    T = 37
    word, pos, typ = (torch.randn(n, size, generator=g).to(dtype) for n in (50, 20, 2))
    pos, typ = (pos if tables > 1 else None), (typ if tables > 2 else None)
    gamma, beta = torch.randn(size, generator=g), (torch.randn(size, generator=g) if bias else None)
    ids, p, t = torch.randint(0, 50, (T,), generator=g), torch.randint(0, 20, (T,), generator=g), \
        torch.randint(0, 2, (T,), generator=g)
    rows = word.double()[ids] + (0 if pos is None else pos.double()[p]) + (0 if typ is None else typ.double()[t])
    expected = F.layer_norm(rows, (size,), gamma.double(), None if beta is None else beta.double(), 1e-12)
    out = native.module().embed_layer_norm(ids, p, t, word, pos, typ, gamma, beta, 1e-12)
    assert out.dtype == dtype and out.shape == (T, size)
    bound = 2e-6 if dtype == torch.float32 else 2e-6 + 2 ** -8 * expected.abs()
    assert ((out.double() - expected).abs() <= bound).all()
    with pytest.raises(RuntimeError, match=r"token id 50 is outside \[0, 50\)"):
        native.module().embed_layer_norm(torch.full((T,), 50), p, t, word, pos, typ, gamma, beta, 1e-12)
