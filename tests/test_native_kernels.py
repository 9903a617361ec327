"""The native module's kernels (``small_layers.cpp``) called directly, on every instruction set this CPU runs: the
product, attention, activation, residual-add-and-LayerNorm and embedding against float64. Each kernel test runs per
ISA the caller may name ("avx512", "avx2", "aten" where ATen has the op), skipped only where ``cpu_runs`` says this
CPU (or build) cannot run it: on an AVX-512 machine both the AVX-512 and the AVX2 kernels are checked."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from padfree.ops import native


def module_on(isa: str):
    """The native module, the test skipped where this CPU cannot run `isa` ("avx512_bf16": the bf16 dot products)."""
    mod = native.module()
    assert mod is not None, native.why_not()
    if isa != "aten" and not mod.cpu_runs(isa):
        pytest.skip(f"this CPU (or build) cannot run {isa}")
    return mod


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to read the built module")
def test_the_built_products_prefetch():
    """The AVX-512 products' software prefetches are in the built module: GCC once dropped every call of an inlined
    helper holding only prefetches (it judged it free of side effects), and nothing else would have shown it but
    speed. (The AVX2 product has none: the EPYC's hardware prefetcher keeps its stream fed.)"""
    name, directory = native.build_dir()
    assert native.module() is not None, native.why_not()
    code = subprocess.run(["objdump", "-d", str(directory / f"{name}.so")], capture_output=True, text=True,
                          check=True).stdout
    assert code.count("prefetcht0") >= 12 and code.count("prefetcht1") >= 12  # own blocks ahead; the next block


# (ISA, kernel): the fp32 weight and the bf16 one widened on both ISAs, bf16 dot products on AVX-512 BF16 alone
PRODUCTS = [("avx512", "fp32"), ("avx512", "widened"), ("avx512_bf16", "dot"), ("avx2", "fp32"), ("avx2", "widened")]


@pytest.mark.parametrize("rows,cols,depth", [(1, 64, 32), (2, 33, 17), (3, 50, 41), (5, 24, 9), (7, 8, 5),
                                             (12, 96, 384), (16, 160, 48), (23, 40, 30), (25, 101, 64), (64, 37, 7),
                                             (128, 70, 24), (3, 40, 300), (4, 70, 520), (9, 33, 600)])
@pytest.mark.parametrize("isa,kernel", PRODUCTS, ids=[f"{i}-{k}" for i, k in PRODUCTS])
def test_native_product_matches_float64(rows, cols, depth, isa, kernel):
    """The native product (fp32 x and bias; an fp32 weight, a bf16 one widened, or a bf16 one in bf16 dot products
    with x rounded to bf16) against the same product in float64: AVX-512: row counts in one call (up to 12), in two
    calls with the next block prefetched (16 rows, 5 blocks), in calls of at most 11 rows (23, 25, 64, 128) and off
    an even split; AVX2: 1-2 rows over the whole block, more over its halves in even calls of at most 6, after a
    first whole-block call of 2 rows where the block is larger than 32 KiB (depth 300: fp32 only, then 1 row over
    the whole block again; 520: both, then 2 rows; 384 and 600: then halves); column counts off the 32-column block
    (33: a last block of one column; 24, 8: halves or vectors without columns), odd depths (the dot kernel's last
    pair half empty)."""
    mod = module_on(isa)
    isa = isa.removesuffix("_bf16")
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, depth, generator=g)
    w = torch.randn(cols, depth, generator=g).to(torch.float32 if kernel == "fp32" else torch.bfloat16)
    b = torch.randn(cols, generator=g)
    y = mod.blocks_linear(x, mod.pack_pairs(w) if kernel == "dot" else mod.pack_blocks(w), cols, b, isa)
    x64 = x.to(torch.bfloat16).double() if kernel == "dot" else x.double()
    expected = x64 @ w.double().T + b.double()
    assert y.shape == (rows, cols) and (y.double() - expected).abs().max() <= 1e-4
    if kernel == "dot":  # x handed over already in bf16 (the stack's activation output): the same product
        assert torch.equal(mod.blocks_linear(x.to(torch.bfloat16), mod.pack_pairs(w), cols, b, isa), y)


# (heads, head size, runs as (sequences, length), the longest sequence the native kernel may take): one token, runs
# of equal lengths, sizes off 16 (and 8) lanes, lengths off 16 keys, the longest sequence the native kernel takes
# (128), one past it and one past the caller's limit (both PyTorch's kernel), an odd head size below 8 with odd
# lengths (the dot kernel's padded pairs)
ATTENTION = [(12, 32, [(1, 8)], 128), (4, 8, [(1, 1), (3, 5), (2, 9)], 128), (12, 64, [(1, 40), (1, 24)], 64),
             (3, 20, [(1, 64)], 64), (2, 80, [(2, 17), (1, 3)], 128), (2, 48, [(1, 100)], 128),
             (2, 16, [(1, 128)], 128), (2, 16, [(1, 129)], 128), (2, 48, [(1, 100)], 64),
             (3, 5, [(1, 11), (2, 6)], 128)]
# (ISA, dot products): fp32 on every ISA (aten: PyTorch's kernel throughout), bf16 dot products on AVX-512 BF16
ATTENTION_ISAS = [("avx512", False), ("avx512_bf16", True), ("avx2", False), ("aten", False)]


@pytest.mark.parametrize("heads,size,runs,max_len", ATTENTION)
@pytest.mark.parametrize("isa,dot", ATTENTION_ISAS, ids=[i + ("-dot" if d else "") for i, d in ATTENTION_ISAS])
def test_native_attention_matches_float64(heads, size, runs, max_len, isa, dot):
    """Each packed sequence attends to itself only, per head: against softmax(q k^T scale) v in float64. On bf16
    dot products (dot; the native kernel's sequences, PyTorch's fp32 kernel above them) q, k, v and the softmax's
    unnormalised weights are rounded to bf16 first, in the reference too."""
    mod = module_on(isa)
    isa = isa.removesuffix("_bf16")
    dot_kernel = dot and max(n for _, n in runs) <= max_len  # longer: PyTorch's kernel, in fp32
    r = (lambda v: v.to(torch.bfloat16).double()) if dot_kernel else (lambda v: v)
    hidden, flat, first = heads * size, [], 0
    for count, n in runs:
        flat += [first, count, n]
        first += count * n
    g = torch.Generator().manual_seed(heads * size)
    qkv = torch.randn(first, 3 * hidden, generator=g) * 2
    out = mod.attention(qkv, flat, heads, 0.3, max_len, dot, isa)
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


@pytest.mark.parametrize("isa", ["avx512", "avx2", "aten"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_native_activation_matches_float64(activation, isa):
    """The stack's activation in place, on a tensor whose length is off 16 (and 8) lanes, against its formula in
    float64 (erf GELU, tanh GELU, ReLU, SiLU)."""
    mod = module_on(isa)
    x = torch.linspace(-10, 10, 10007).view(1, -1)
    d = x.double()
    expected = {"gelu": d * 0.5 * (1 + torch.special.erf(d / 2 ** 0.5)),
                "gelu_tanh": d * 0.5 * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (d + 0.044715 * d ** 3))),
                "relu": d.clamp(min=0), "silu": d * torch.sigmoid(d)}[activation]
    y = x.clone()
    mod.activate_(y, activation, isa)
    assert ((y.double() - expected).abs() <= 2e-6 + 1e-6 * expected.abs()).all()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "aten"])
@pytest.mark.parametrize("rows,size", [(3, 100), (1, 384), (200, 768), (2, 5)])
def test_native_add_layer_norm_matches_float64(rows, size, isa):
    """The stack's residual add fused with LayerNorm, in place: on row sizes off 16 and 8 lanes (100; 5: the tail
    alone), one row, and enough rows to split over the threads, against LayerNorm of the fp32 sum in float64, within
    twice ATen's own fp32 error on the same rows. The rows' mean is large (50 against a spread of 1.4), where a
    one-pass variance would lose most of its digits."""
    mod = module_on(isa)
    torch.manual_seed(0)
    y, x = torch.randn(rows, size) + 50, torch.randn(rows, size)
    gamma, beta = torch.randn(size), torch.randn(size)
    total = y + x  # the residual add in fp32, as the stack does it
    expected = F.layer_norm(total.double(), (size,), gamma.double(), beta.double(), 1e-12)
    aten = (F.layer_norm(total, (size,), gamma, beta, 1e-12).double() - expected).abs().max()
    out = y.clone()
    mod.add_layer_norm_(out, x, gamma, beta, 1e-12, isa)
    assert (out.double() - expected).abs().max() <= 2 * aten + 1e-6


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size,tables,bias", [(100, 3, True), (384, 1, True), (64, 2, False), (13, 3, True)])
def test_native_embedding_matches_float64(dtype, size, tables, bias, isa):
    """The embedding in one native pass: word, position and token-type rows (fp32 or bf16 tables; the latter two
    optional) summed and LayerNormed (with or without bias) against float64; fp32 within 2e-6, bf16 within its one
    final rounding. An index past a table is an error naming it, not a read past the table."""
    mod = module_on(isa)
    g = torch.Generator().manual_seed(size)
    T = 37
    word, pos, typ = (torch.randn(n, size, generator=g).to(dtype) for n in (50, 20, 2))
    pos, typ = (pos if tables > 1 else None), (typ if tables > 2 else None)
    gamma, beta = torch.randn(size, generator=g), (torch.randn(size, generator=g) if bias else None)
    ids, p, t = torch.randint(0, 50, (T,), generator=g), torch.randint(0, 20, (T,), generator=g), \
        torch.randint(0, 2, (T,), generator=g)
    rows = word.double()[ids] + (0 if pos is None else pos.double()[p]) + (0 if typ is None else typ.double()[t])
    expected = F.layer_norm(rows, (size,), gamma.double(), None if beta is None else beta.double(), 1e-12)
    out = mod.embed_layer_norm(ids, p, t, word, pos, typ, gamma, beta, 1e-12, isa)
    assert out.dtype == dtype and out.shape == (T, size)
    bound = 2e-6 if dtype == torch.float32 else 2e-6 + 2 ** -8 * expected.abs()
    assert ((out.double() - expected).abs() <= bound).all()
    with pytest.raises(RuntimeError, match=r"token id 50 is outside \[0, 50\)"):
        mod.embed_layer_norm(torch.full((T,), 50), p, t, word, pos, typ, gamma, beta, 1e-12, isa)


def small_stack(hidden=64, heads=4, ffn=160, layers=2, seed=0):
    """A post-LN stack's per-layer weights (random, LayerNorms near identity): per layer the weights of the QKV,
    attention-output, FFN-in and FFN-out linears, their biases, and the two LayerNorms' (weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3 * hidden, hidden), (hidden, hidden), (ffn, hidden), (hidden, ffn)]
    out = []
    for _ in range(layers):
        w = [torch.randn(s, generator=g) * s[1] ** -0.5 for s in shapes]
        b = [torch.randn(s[0], generator=g) * 0.1 for s in shapes]
        norms = [(1 + 0.1 * torch.randn(hidden, generator=g), 0.1 * torch.randn(hidden, generator=g))
                 for _ in range(2)]
        out.append((w, b, norms))
    return out


def layer_fields(layer, pack) -> dict:
    """One of small_stack's layers as StackLayer's fields by name, its weights packed by `pack`."""
    (wq, wo, wi, wf), (bq, bo, bi, bf), ((g1, b1), (g2, b2)) = layer
    return dict(qkv_weight=wq, qkv_packed=pack(wq), qkv_bias=bq,
                attn_out_weight=wo, attn_out_packed=pack(wo), attn_out_bias=bo,
                attn_norm_weight=g1, attn_norm_bias=b1,
                ffn_in_weight=wi, ffn_in_packed=pack(wi), ffn_in_bias=bi,
                ffn_out_weight=wf, ffn_out_packed=pack(wf), ffn_out_bias=bf,
                ffn_norm_weight=g2, ffn_norm_bias=b2)


def stack_layers(mod, layers, pack, packing: str) -> list:
    """small_stack's layers as the module's StackLayers of one packing."""
    return [mod.StackLayer(packing=packing, **layer_fields(layer, pack)) for layer in layers]


def stack_float64(x, layers, runs, heads, scale, eps):
    """post_ln_layers' stack in float64: attention per sequence, erf GELU."""
    x = x.double()
    for (wq, wo, wi, wf), (bq, bo, bi, bf), ((g1, b1), (g2, b2)) in layers:
        qkv = x @ wq.double().T + bq.double()
        T, H = x.shape
        d = H // heads
        ctx = torch.empty(T, H, dtype=torch.float64)
        for first, count, n in zip(runs[::3], runs[1::3], runs[2::3]):
            for s in range(count):
                t = first + s * n
                q, k, v = qkv[t:t + n].view(n, 3, heads, d).permute(1, 2, 0, 3)
                ctx[t:t + n] = torch.softmax(q @ k.transpose(1, 2) * scale, -1).matmul(v).transpose(0, 1).reshape(n, H)
        h = F.layer_norm(ctx @ wo.double().T + bo.double() + x, (H,), g1.double(), b1.double(), eps)
        f = F.gelu(h @ wi.double().T + bi.double())
        x = F.layer_norm(f @ wf.double().T + bf.double() + h, (H,), g2.double(), b2.double(), eps)
    return x


@pytest.mark.parametrize("isa", ["avx512", "avx2", "aten"])
def test_native_stack_matches_float64(isa):
    """post_ln_layers end to end on each ISA (its kernels on pack_blocks' packings; aten: ATen's ops on oneDNN's
    packings), two layers over runs of unequal lengths, against the stack in float64."""
    mod = module_on(isa)
    layers, heads = small_stack(), 4
    runs = [0, 2, 7, 14, 1, 33]  # two sequences of 7 tokens, one of 33
    x = torch.randn(47, 64, generator=torch.Generator().manual_seed(1))
    pack, packing = ((lambda w: torch.ops.mkldnn._reorder_linear_weight(w)), "onednn") if isa == "aten" \
        else (mod.pack_blocks, "blocks")
    y = mod.post_ln_layers(x, stack_layers(mod, layers, pack, packing), runs, heads, 0.25, 1e-12, "gelu", 128, isa)
    assert (y.double() - stack_float64(x, layers, runs, heads, 0.25, 1e-12)).abs().max() <= 1e-4


# (field, a wrong value for it given the others: the layer's hidden size 64, FFN size 160, packing "blocks")
WRONG_FIELDS = [("qkv_weight", lambda f: f["qkv_weight"][:-1]), ("qkv_packed", lambda f: f["attn_out_packed"]),
                ("qkv_bias", lambda f: f["attn_out_bias"]), ("attn_out_weight", lambda f: f["attn_out_weight"].T[:5]),
                ("attn_out_packed", lambda f: f["attn_out_packed"].to(torch.bfloat16)),
                ("attn_out_bias", lambda f: f["attn_out_bias"].double()),
                ("attn_norm_weight", lambda f: f["attn_norm_weight"][:-1]),
                ("attn_norm_bias", lambda f: f["attn_norm_bias"].to(torch.bfloat16)),
                ("ffn_in_weight", lambda f: f["ffn_in_weight"][0]), ("ffn_in_packed", lambda f: f["ffn_out_packed"]), ("ffn_in_bias", lambda f: f["ffn_out_bias"]),
                ("ffn_out_weight", lambda f: f["ffn_in_weight"]), ("ffn_out_packed", lambda f: f["ffn_in_packed"]),
                ("ffn_out_bias", lambda f: f["ffn_out_bias"][::2]),
                ("ffn_norm_weight", lambda f: f["ffn_norm_weight"].view(8, 8)),
                ("ffn_norm_bias", lambda f: f["ffn_norm_bias"][:3])]


@pytest.mark.parametrize("field,wrong", WRONG_FIELDS, ids=[f for f, _ in WRONG_FIELDS])
def test_a_stack_layer_refuses_a_wrong_field_naming_it(field, wrong):
    """StackLayer checks each field once, where it is built: a tensor of the wrong shape, dtype or packing (the
    attention output's where the QKV's belongs, an FFN weight transposed, a bias in another dtype) is an error
    naming that field, before any product runs."""
    mod = native.module()
    assert mod is not None, native.why_not()
    fields = layer_fields(small_stack(layers=1)[0], mod.pack_blocks)
    mod.StackLayer(packing="blocks", **fields)  # as built: accepted
    with pytest.raises(RuntimeError, match=rf"StackLayer: {field} must be "):
        mod.StackLayer(packing="blocks", **dict(fields, **{field: wrong(fields)}))


def test_a_stack_layer_states_its_packing():
    """The packing is a named field, checked against the packed weights and, at each call, against the isa and the
    input: an unknown packing, packed weights of another packing, a field left out, an input of another width and
    the module's own products on isa 'aten' are errors naming what is wrong."""
    mod = native.module()
    assert mod is not None, native.why_not()
    layer = small_stack(layers=1)[0]
    blocks = layer_fields(layer, mod.pack_blocks)
    assert mod.StackLayer(packing="blocks", **blocks).packing == "blocks"
    with pytest.raises(RuntimeError, match=r"StackLayer: unknown packing 'fp32' \(blocks, pairs, onednn, mkl or int8\)"):
        mod.StackLayer(packing="fp32", **blocks)
    with pytest.raises(RuntimeError, match=r"StackLayer: qkv_packed must be oneDNN's packing \[192, 64\]"):
        mod.StackLayer(packing="onednn", **blocks)
    with pytest.raises(RuntimeError, match=r"StackLayer: qkv_weight must be a \[192, 64\] bf16 tensor for packing "
                                           r"'pairs'"):
        mod.StackLayer(packing="pairs", **blocks)
    with pytest.raises(TypeError):  # every field by name, none left out, none by position
        mod.StackLayer(packing="blocks", **{k: v for k, v in blocks.items() if k != "ffn_norm_bias"})
    with pytest.raises(TypeError):
        mod.StackLayer("blocks", *blocks.values())
    stack = [mod.StackLayer(packing="blocks", **blocks)]
    with pytest.raises(RuntimeError, match=r"post_ln_layers: layer 0 takes \[T, 64\], x is \[3, 32\]"):
        mod.post_ln_layers(torch.randn(3, 32), stack, [0, 1, 3], 4, 0.25, 1e-12, "gelu", 128, "aten")
    with pytest.raises(RuntimeError, match=r"post_ln_layers: layer 0's packing 'blocks' needs isa 'avx2' or "
                                           r"'avx512'.*got 'aten'"):
        mod.post_ln_layers(torch.randn(3, 64), stack, [0, 1, 3], 4, 0.25, 1e-12, "gelu", 128, "aten")


def test_an_unknown_or_unsupported_isa_is_an_error():
    """An ISA name the module does not know, one this CPU cannot run, an op ATen lacks and bf16 dot products off
    AVX-512 BF16 are errors naming what was asked for, never a silent fallback to another ISA."""
    mod = native.module()
    assert mod is not None, native.why_not()
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    qkv, ids = torch.randn(4, 3 * 16), torch.zeros(2, dtype=torch.long)
    calls = {"blocks_linear": lambda isa: mod.blocks_linear(x, mod.pack_blocks(w), 8, b, isa),
             "attention": lambda isa: mod.attention(qkv, [0, 1, 4], 2, 0.3, 128, False, isa),
             "activate_": lambda isa: mod.activate_(x.clone(), "gelu", isa),
             "add_layer_norm_": lambda isa: mod.add_layer_norm_(x.clone(), x, b.repeat(2), b.repeat(2), 1e-12, isa),
             "embed_layer_norm": lambda isa: mod.embed_layer_norm(ids, None, None, w, None, None, b.repeat(2), None,
                                                                  1e-12, isa),
             "post_ln_layers": lambda isa: mod.post_ln_layers(x, [], [0, 1, 3], 2, 0.3, 1e-12, "gelu", 128, isa)}
    for name, call in calls.items():
        for wrong in ("avx3", "AVX2", ""):
            with pytest.raises(RuntimeError, match=rf"{name}: unknown isa '{wrong}' \(avx512, avx2 or aten\)"):
                call(wrong)
        for isa in ("avx512", "avx2"):
            if not mod.cpu_runs(isa):
                with pytest.raises(RuntimeError, match=rf"{name}: isa '{isa}' cannot run here: this (CPU lacks|build)"):
                    call(isa)
    for name in ("blocks_linear", "embed_layer_norm"):  # no ATen op on the native layouts
        with pytest.raises(RuntimeError, match=rf"{name}: needs isa 'avx2' or 'avx512'.*got 'aten'"):
            calls[name]("aten")
    with pytest.raises(RuntimeError, match=r"cpu_runs: unknown instruction set 'avx3'"):
        mod.cpu_runs("avx3")
    pairs = mod.pack_pairs(w.to(torch.bfloat16))
    weights, biases, norms = small_stack(layers=1)[0]
    dot_layer = mod.StackLayer(packing="pairs", **layer_fields(([v.to(torch.bfloat16) for v in weights], biases, norms),
                                                                mod.pack_pairs))
    for isa in ("aten", "avx2", "avx512"):  # bf16 dot products: AVX-512 BF16 alone
        if isa != "aten" and not mod.cpu_runs(isa) or mod.cpu_runs("avx512_bf16") and isa == "avx512":
            continue
        why = r"needs isa 'avx2' or 'avx512'" if isa == "aten" else r"bf16 dot products .*(got isa 'avx2'|cannot run here)"
        with pytest.raises(RuntimeError, match=rf"blocks_linear: {why}"):
            mod.blocks_linear(x, pairs, 8, b, isa)
        with pytest.raises(RuntimeError, match=rf"attention: bf16 dot products .*(got isa '{isa}'|cannot run here)"):
            mod.attention(qkv, [0, 1, 4], 2, 0.3, 128, True, isa)
        why = r"layer 0's packing 'pairs' needs isa 'avx2' or 'avx512'" if isa == "aten" \
            else r"bf16 dot products .*(got isa 'avx2'|cannot run here)"
        with pytest.raises(RuntimeError, match=rf"post_ln_layers: {why}"):
            mod.post_ln_layers(torch.randn(3, 64), [dot_layer], [0, 1, 3], 4, 0.3, 1e-12, "gelu", 128, isa)
