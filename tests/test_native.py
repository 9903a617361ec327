"""The native small-batch stack (``padfree.ops.native``, ``small_layers.cpp``): its product, attention, activation,
residual-add-and-LayerNorm and embedding kernels against float64; where the stack applies it gives the Python
forward's result (fp32) or the fp32 forward's on the bf16-rounded weights (bf16) within rounding, and transformers'
within the family tolerances; it is really taken there; it follows parameters replaced or updated in place; a build
that fails leaves the Python forward in charge; ``PADFREE_NATIVE`` is checked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import padfree
from family_zoo import BF16_ATOL, batch, bf16_errors, hf_hidden, make, max_diff
from padfree.ops import native, onednn_backend

# plain post-LN families and their activations: erf GELU, tanh GELU, ReLU; ALBERT shares layers (its schedule)
FAMILIES = [("bert", 0), ("bert", 1), ("roberta", 1), ("distilbert", 1), ("albert", 1), ("electra", 0)]
# fp32 batches the stack takes: one sequence, one token, runs of equal lengths, mixed runs, the most on the native
# product on Intel CPUs (OWN_PRODUCT_ROWS = 48), the most on MKL's there (SMALL_ROWS = 64), the most on the native
# product on AMD's (96) and on oneDNN's there (ONEDNN_STACK_ROWS = 128)
LAYOUTS = {"one": [7], "one-token": [1], "equal-runs": [5, 5, 5, 2], "mixed": [3, 9, 9, 1, 12, 4],
           "48": [40, 8], "64": [40, 24], "96": [40, 40, 16], "128": [40, 40, 40, 8]}
BF16_LAYOUTS = {"mixed": [3, 9, 9, 1, 12, 4], "limit": [40, 40, 33, 15]}  # up to BF16_NATIVE_ROWS = 128


def test_the_native_module_builds_here():
    """CI has a compiler: the module must build (a broken source must fail CI, not fall back unnoticed)."""
    assert native.module() is not None, native.why_not()


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump to read the built module")
def test_the_built_products_prefetch():
    """The products' software prefetches are in the built module: GCC once dropped every call of an inlined helper
    holding only prefetches (it judged it free of side effects), and nothing else would have shown it but speed."""
    name, directory = native.build_dir()
    assert native.module() is not None, native.why_not()
    code = subprocess.run(["objdump", "-d", str(directory / f"{name}.so")], capture_output=True, text=True,
                          check=True).stdout
    assert code.count("prefetcht0") >= 12 and code.count("prefetcht1") >= 12  # own blocks ahead; the next block


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f"{f}-{s}" for f, s in FAMILIES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_stack_matches_the_python_forward_and_transformers(family, shape, layout, monkeypatch):
    if sum(LAYOUTS[layout]) > _fp32_stack_rows():
        pytest.skip(f"the fp32 stack takes at most {_fp32_stack_rows()} tokens on this CPU")
    model = make(family, shape)
    enc = padfree.from_pretrained(model)
    ids, mask, types, kw = batch(model, LAYOUTS[layout], "right")
    packed = enc.pack(ids, mask, types)
    with torch.inference_mode():  # the stack is taken for this batch (not the layer-by-layer fallback)
        x = enc._embed(packed)
        assert enc.kernels.post_ln_layers(x, list(enc.layers), packed.runs, enc.config.num_heads,
                                          enc.config.attention_scale, enc.config.layer_norm_eps,
                                          enc.config.activation) is not None
    out = enc(ids, mask, types).last_hidden_state
    assert max_diff(out, hf_hidden(model, ids, mask, kw), mask) <= 1e-4
    monkeypatch.setenv("PADFREE_NATIVE", "0")  # the Python forward: the same products, within fp32 rounding
    assert max_diff(out, enc(ids, mask, types).last_hidden_state, mask) <= 1e-5


def _fp32_stack_rows() -> int:
    """The most tokens the fp32 stack takes on this CPU (its own product, MKL's or oneDNN's)."""
    return max(onednn_backend.OWN_PRODUCT_ROWS, onednn_backend.SMALL_ROWS, onednn_backend.ONEDNN_STACK_ROWS)


def _stack(enc, x, runs):
    cfg = enc.config
    with torch.inference_mode():
        return enc.kernels.post_ln_layers(x, list(enc.layers), runs, cfg.num_heads, cfg.attention_scale,
                                          cfg.layer_norm_eps, cfg.activation)


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


def reference_stack(x, layers, cu_seqlens, cfg, round_inputs: bool) -> torch.Tensor:
    """The post-LN layers in float64, straight from their formulas; ``round_inputs``: each product's input
    rounded to bf16 first (what bf16 dot products compute on), the attention's too (q, k, v and the softmax's
    unnormalised weights)."""
    r = (lambda v: v.to(torch.bfloat16).double()) if round_inputs else (lambda v: v)
    act = {"gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "relu": F.relu}[cfg.activation]
    x, bounds = x.double(), cu_seqlens.tolist()
    for layer in layers:
        t = [v.double() for v in layer.tensors()]
        qkv = r(x) @ t[0].T + t[1]
        ctx = torch.empty_like(x)
        for a, b in zip(bounds[:-1], bounds[1:]):
            q, k, v = qkv[a:b].view(b - a, 3, cfg.num_heads, -1).permute(1, 2, 0, 3)
            scores = r(q) @ r(k).transpose(1, 2) * cfg.attention_scale
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            ctx[a:b] = (r(weights) @ r(v) / weights.sum(-1, keepdim=True)).transpose(0, 1).reshape(b - a, -1)
        h = F.layer_norm(r(ctx) @ t[2].T + t[3] + x, x.shape[-1:], t[4], t[5], cfg.layer_norm_eps)
        x = F.layer_norm(r(act(r(h) @ t[6].T + t[7])) @ t[8].T + t[9] + h, x.shape[-1:], t[10], t[11],
                         cfg.layer_norm_eps)
    return x


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f"{f}-{s}" for f, s in FAMILIES])
@pytest.mark.parametrize("layout", list(BF16_LAYOUTS))
@pytest.mark.parametrize("kernel", ["widened", "dot"])
def test_bf16_stack_is_the_fp32_stack_on_the_bf16_weights(family, shape, layout, kernel, monkeypatch):
    """A bf16 model's small batch runs the fp32 stack on its bf16 weights, on either product kernel. On fp32 FMAs
    of the widened weights it gives the float64 stack's result on the bf16 weights to within the final bf16
    rounding. On bf16 dot products each product's input is rounded to bf16 first, and roundings that flip on
    fp32 noise spread through the layers, so its error may be at most twice what that rounding costs the float64
    stack (the bf16 rule's form). The whole forward keeps the bf16 rule against transformers."""
    mod = native.module()
    if not (mod.has_avx512_bf16() if kernel == "dot" else mod.has_avx512()):
        pytest.skip(f"this CPU lacks the {kernel} kernel's AVX-512 instructions")
    monkeypatch.setattr(onednn_backend, "BF16_DOT", kernel == "dot")
    model = make(family, shape)
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16)
    ids, mask, types, kw = batch(model, BF16_LAYOUTS[layout], "right")
    packed = enc.pack(ids, mask, types)
    with torch.inference_mode():
        x = enc._embed(packed)  # [T, H] bf16
        exact = reference_stack(x, list(enc.layers), packed.cu_seqlens, enc.config, round_inputs=False)
    ours = _stack(enc, x, packed.runs)
    assert ours.dtype == torch.bfloat16
    error = (ours.double() - exact).abs()
    if kernel == "widened":
        bound = exact.abs() * 2 ** -8 + 1e-4  # (2^-8 |y| >= half a bf16 ulp of y) and fp32 noise
        assert (error <= bound).all(), (error / bound).max()
    else:
        with torch.inference_mode():
            rounded = reference_stack(x, list(enc.layers), packed.cu_seqlens, enc.config, round_inputs=True)
        cost = (rounded - exact).abs().max()
        assert error.max() <= 2 * cost + 1e-3, f"{error.max():.4f} vs rounding's own {cost:.4f}"
    mine, theirs = bf16_errors(model, lambda m: enc(ids, mask, types).last_hidden_state if m is None
                               else hf_hidden(m, ids, mask, kw), mask)
    assert mine <= 2 * theirs + BF16_ATOL, f"{family} bf16: {mine:.3f} vs transformers' own bf16 {theirs:.3f}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_stack_follows_parameters_updated_in_place(dtype):
    """The stack's arguments are kept per layer between calls: a weight and a LayerNorm vector updated in place after
    a forward must be used by the next one (fp32: the same tensors; bf16: their packed and fp32 copies rebuilt), as
    the same update gives in a fresh encoder."""
    model = make("bert", 0)
    enc = padfree.from_pretrained(model, dtype=dtype)
    ids, mask, types, _ = batch(model, [7, 3], "right")
    before = enc(ids, mask, types).last_hidden_state
    with torch.no_grad():  # by -2: exact in bf16 as in fp32
        enc.layers[0].ffn_in.weight.mul_(-2)
        enc.layers[1].ffn_norm.bias.mul_(-2)
        model.encoder.layer[0].intermediate.dense.weight.mul_(-2)
        model.encoder.layer[1].output.LayerNorm.bias.mul_(-2)
    after = enc(ids, mask, types).last_hidden_state
    fresh = padfree.from_pretrained(model, dtype=dtype)(ids, mask, types).last_hidden_state
    assert max_diff(after, before, mask) > 0.1
    assert max_diff(after, fresh, mask) == 0


def test_native_stack_is_not_taken_where_it_does_not_apply():
    """Above the stack's limits (fp32: the largest of OWN_PRODUCT_ROWS, SMALL_ROWS and ONEDNN_STACK_ROWS, bf16:
    BF16_NATIVE_ROWS), in fp16 and for layers with relative terms, the encoder runs layer by layer."""
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    cfg = enc.config
    fp32_rows = _fp32_stack_rows() + 1
    bf16_rows = onednn_backend.BF16_NATIVE_ROWS + 1
    for x in (torch.randn(fp32_rows, cfg.hidden_size), torch.randn(bf16_rows, cfg.hidden_size, dtype=torch.bfloat16),
              torch.randn(8, cfg.hidden_size, dtype=torch.float16)):
        runs = ((0, 1, x.shape[0]),)
        assert enc.kernels.post_ln_layers(x, list(enc.layers), runs, cfg.num_heads, cfg.attention_scale,
                                          cfg.layer_norm_eps, cfg.activation) is None
    mpnet = make("mpnet", 0)  # relative bias: never offered to the stack, still right
    ids, mask, types, kw = batch(mpnet, [7, 3], "right")
    out = padfree.from_pretrained(mpnet)(ids, mask).last_hidden_state
    assert max_diff(out, hf_hidden(mpnet, ids, mask, kw), mask) <= 1e-4


def test_a_failed_build_falls_back_to_the_python_forward(tmp_path):
    """No usable compiler and an empty cache: the module is unavailable with the build's reason, logged once, and
    the encoder still answers (the Python forward), equal to transformers."""
    code = (
        "import torch, padfree, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from family_zoo import batch, hf_hidden, make, max_diff\n"
        "from padfree.ops import native\n"
        "model = make('bert', 0); enc = padfree.from_pretrained(model)\n"
        "ids, mask, types, kw = batch(model, [7, 3], 'right')\n"
        "d = max_diff(enc(ids, mask, types).last_hidden_state, hf_hidden(model, ids, mask, kw), mask)\n"
        "print('module', native.module()); print('why', native.why_not()); print('diff', d)\n")
    env = dict(os.environ, PADFREE_CACHE=str(tmp_path), CXX="/bin/false", PADFREE_NATIVE="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "module None" in run.stdout and "why None" not in run.stdout, run.stdout
    assert float(run.stdout.split("diff ")[1]) <= 1e-4
    assert run.stderr.count("native small-batch layers unavailable") == 1, run.stderr[-2000:]


def test_padfree_native_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("PADFREE_NATIVE", "yes")
    with pytest.raises(ValueError, match="PADFREE_NATIVE must be 0 or 1"):
        native.enabled()
    monkeypatch.setenv("PADFREE_NATIVE", "0")
    assert native.module() is None and native.why_not() == "PADFREE_NATIVE=0"


def _forward_in_a_new_thread(enc, ids, mask) -> tuple[int, dict[int, set[int]]]:
    """A forward from a new thread (libgomp gives each calling thread its own team of workers): the caller's thread
    id and the CPU affinity of every thread that appeared meanwhile."""
    before, out = set(os.listdir("/proc/self/task")), {}

    def work():
        out["caller"] = threading.get_native_id()
        enc(ids, mask)
        out["new"] = {int(t): os.sched_getaffinity(int(t)) for t in set(os.listdir("/proc/self/task")) - before}
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out["caller"], out["new"]


def test_a_cpu_forward_pins_torchs_workers_one_per_cpu(monkeypatch):
    """Where the process may run on exactly as many CPUs as torch has threads, a CPU forward pins the OpenMP workers
    of its calling thread each to its own CPU and leaves the caller free; PADFREE_PIN_THREADS=0 leaves them all
    free, and another value is refused."""
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    if threads < 2 or len(allowed) != threads:
        pytest.skip(f"{len(allowed)} CPUs allowed for {threads} torch threads: pinning does not apply")
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    ids, mask, _, _ = batch(model, [40, 24], "right")
    caller, new = _forward_in_a_new_thread(enc, ids, mask)
    pinned = [cpus for tid, cpus in new.items() if tid != caller and len(cpus) == 1]
    assert new[caller] == allowed and len(pinned) == threads - 1, new
    assert len(set.union(*pinned)) == threads - 1 and set.union(*pinned) <= allowed  # each on its own CPU
    monkeypatch.setattr(native, "PIN_THREADS", False)
    caller, new = _forward_in_a_new_thread(enc, ids, mask)
    assert all(cpus == allowed for cpus in new.values()), new
    monkeypatch.setenv("PADFREE_PIN_THREADS", "yes")
    with pytest.raises(ValueError, match="PADFREE_PIN_THREADS must be 0 or 1"):
        native._pin_threads()
