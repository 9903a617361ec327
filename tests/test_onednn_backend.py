"""The CPU oneDNN backend's fused linear ops against the pure-PyTorch references, and the registry's composition."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from padfree import cpu, ops
from padfree.ops import torch_backend
from padfree.ops.registry import FUSED_OPS, OPS, PRIMITIVES, Kernels

onednn = pytest.importorskip("padfree.ops.onednn_backend")
pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _data(T=23, K=48, N=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(T, K, generator=g), torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    return x.to(dtype), w.to(dtype), b.to(dtype)


# The small-batch path (MKL's packed sgemm) is in the plan of Intel CPUs only (mkl_small_rows = 64; 0 on AMD's, where
# MKL's sgemm is slow): these tests run under a plan with it at that limit everywhere, so that every CPU checks it.
SMALL = 64
PLAN = cpu.current().replace(mkl_small_rows=SMALL)
# token counts on each side of the small-batch limit: fp32 takes MKL's packed sgemm at or below it, oneDNN above
ROWS = [23, SMALL, SMALL + 1, 200]


def _onednn_runs(dtype):
    """Skip a bf16 case where oneDNN's bf16 products cannot run on this CPU (the registry never picks them there)."""
    if dtype == torch.bfloat16 and not PLAN.onednn_bf16:
        pytest.skip(PLAN.reasons["onednn_bf16"])


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "relu", "silu", "quick_gelu"])
def test_linear_bias_act(dtype, act, T):
    _onednn_runs(dtype)
    x, w, b = _data(T=T, dtype=dtype)
    ref = ops.bias_act_ref(F.linear(x.float(), w.float()), b, act)
    torch.testing.assert_close(onednn.linear_bias_act(x, w, b, act, plan=PLAN).float(), ref, **TOL[dtype])


@pytest.mark.parametrize("T", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_residual_layer_norm(dtype, T):
    _onednn_runs(dtype)
    x, w, b = _data(T=T, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    r, lw, lb = torch.randn(T, 40, generator=g).to(dtype), torch.randn(40, generator=g), torch.randn(40, generator=g)
    ref = ops.add_bias_residual_layer_norm_ref(F.linear(x.float(), w.float()), b, r, lw, lb, 1e-12)
    out = onednn.linear_residual_layer_norm(x, w, b, r, lw.to(dtype), lb.to(dtype), 1e-12, plan=PLAN)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("T", [1, 23, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_tanh(dtype, T):
    """BERT's pooler: a few rows on the native product (where the plan has native kernels), more on oneDNN's;
    against tanh(x W^T + b) in fp32."""
    x, w, b = _data(T=T, dtype=dtype)
    native_rows = PLAN.bf16_native_rows if dtype == torch.bfloat16 else PLAN.own_product_rows
    if PLAN.native_isa in ("avx512", "avx2"):
        assert (onednn._native_linear(x, w, b, PLAN) is not None) == (T <= native_rows)
    if T > native_rows or PLAN.native_isa not in ("avx512", "avx2"):
        _onednn_runs(dtype)
    ref = torch.tanh(F.linear(x.float(), w.float(), b.float()))
    torch.testing.assert_close(onednn.linear_tanh(x, w, b, plan=PLAN).float(), ref, **TOL[dtype])


@pytest.mark.parametrize("contiguous", [True, False])
def test_embed_layer_norm(contiguous):
    """The embedding (native where the CPU has AVX-512; a table that is not contiguous, e.g. a transposed view, takes
    the torch ops) against the reference."""
    g = torch.Generator().manual_seed(4)
    word = torch.randn(50, 48, generator=g) if contiguous else torch.randn(48, 50, generator=g).t()
    pos, typ = torch.randn(20, 48, generator=g), torch.randn(2, 48, generator=g)
    w, b = torch.randn(48, generator=g), torch.randn(48, generator=g)
    ids, p, t = (torch.randint(0, n, (23,), generator=g) for n in (50, 20, 2))
    torch.testing.assert_close(onednn.embed_layer_norm(ids, p, t, word, pos, typ, w, b, 1e-12, plan=PLAN),
                               ops.embed_layer_norm_ref(ids, p, t, word, pos, typ, w, b, 1e-12), **TOL[torch.float32])


@pytest.mark.parametrize("lengths", [[1], [5, 5, 5, 1, 17, 17, 2], [33] * 3 + [2], [4, 9, 4, 9]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_varlen_attention_matches_reference(lengths, dtype):
    _onednn_runs(dtype)
    heads, H = 4, 32
    T = sum(lengths)
    x, w, b = _data(T=T, K=H, N=3 * H, dtype=dtype, seed=len(lengths))
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ref = ops.varlen_attention_ref(F.linear(x.float(), w.float()), cu, max(lengths), heads, b.float())
    out = onednn.qkv_varlen_attention(x, w, b, cu, max(lengths), heads, plan=PLAN)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_runs_group_consecutive_equal_lengths():
    cu = torch.tensor([0, 3, 6, 7, 9, 11, 14], dtype=torch.int32)  # lengths 3 3 1 2 2 3
    assert torch_backend.equal_length_runs(cu) == ((0, 2, 3), (6, 1, 1), (7, 2, 2), (11, 1, 3))


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="no MKL in this torch build")
def test_the_mkl_packing_serves_every_small_row_count():
    """The MKL copy of a weight is packed once (tuned for SMALL_ROWS rows) and then serves batches of any row count
    up to the limit; this holds for the MKL in torch today, and must fail loudly if a future one ties the packed
    layout to the row count it was packed for."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(72, 48, generator=g), torch.randn(72, generator=g)
    for T in range(1, SMALL + 1):
        x = torch.randn(T, 48, generator=g)
        torch.testing.assert_close(onednn._linear(x, w, b, PLAN), x.double().matmul(w.double().T).add(b).float(),
                                   atol=2e-5, rtol=2e-5, msg=f"{T} rows")
    assert (id(w), "mkl") in onednn._packed  # the products above took the MKL path


def test_the_small_batch_path_can_be_turned_off():
    """PADFREE_SMALL_ROWS=0 (a plan with mkl_small_rows 0): no MKL copy is made and small batches take oneDNN's
    fused path; a value that is not a count is refused with its name."""
    plan = cpu.plan_for(PLAN.profile, cpu.Settings.from_env({"PADFREE_SMALL_ROWS": "0"}))
    x, w, b = _data(T=4)
    w = torch.nn.Parameter(w, requires_grad=False)
    torch.testing.assert_close(onednn.linear_bias_act(x, w, b, "gelu", plan=plan), F.gelu(F.linear(x, w, b)),
                               atol=2e-5, rtol=2e-5)
    assert (id(w), "onednn") in onednn._packed and (id(w), "mkl") not in onednn._packed
    for bad in ("-1", "64 rows", ""):
        with pytest.raises(ValueError, match="PADFREE_SMALL_ROWS must be an integer >= 0"):
            cpu.Settings.from_env({"PADFREE_SMALL_ROWS": bad})


@pytest.mark.parametrize("T", [8, 100])  # the small path's MKL copy and oneDNN's
def test_packed_weight_is_cached_and_repacked_after_an_in_place_update(T):
    x, w, b = _data(T=T)
    w = torch.nn.Parameter(w, requires_grad=False)
    first = onednn.linear_bias_act(x, w, b, "relu", plan=PLAN)
    layout = "mkl" if onednn._small(x, w, PLAN) else "onednn"
    assert onednn.packed_weight(w, layout) is onednn.packed_weight(w, layout)
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(onednn.linear_bias_act(x, w, None, "relu", plan=PLAN), F.relu(F.linear(x, w)))
    assert not torch.allclose(first, onednn.linear_bias_act(x, w, b, "relu", plan=PLAN))


def test_registry_picks_onednn_on_cpu_and_composes_elsewhere():
    k = Kernels.resolve("cpu", torch.float32, 64)
    assert k.names["linear_bias_act"] == "onednn" and k.names["varlen_attention"] == "torch"
    k16 = Kernels.resolve("cpu", torch.float16, 64)  # no oneDNN fp16 path: composed from the torch primitives
    assert k16.names["linear_bias_act"] == "composed(torch)"
    kt = Kernels.resolve("cpu", torch.float32, 64, backend="torch")
    x, w, b = _data()
    torch.testing.assert_close(kt.linear_bias_act(x, w, b, "gelu"), k.linear_bias_act(x, w, b, "gelu"),
                               atol=2e-5, rtol=2e-5)


def test_each_composition_declares_the_primitive_it_calls():
    """The registry's declarations say what is true: a fused op declared composed from a primitive has a composition
    that takes and calls it (a stand-in records the call), and the two whose compositions call none (the pooler's:
    torch ops alone; the stack's: None) declare none and take none, listed after named_after's backend."""
    x, w, b = _data(T=4, K=8, N=6)
    args = {"qkv_varlen_attention": (x, w, b, torch.tensor([0, 4]), 4, 2), "linear_bias_act": (x, w, b, "gelu"),
            "linear_gated_act": (x, w, b, "gelu"), "linear_residual_layer_norm": (x, w, b, x[:, :6], b, b, 1e-5)}
    for name in FUSED_OPS:
        op = OPS[name]
        takes = len(inspect.signature(op.compose).parameters)
        if op.composed_from is None:
            assert takes == 0 and op.named_after in PRIMITIVES, name
            continue
        assert takes == 1 and op.composed_from in PRIMITIVES and op.named_after is None, name
        called = []
        composed = op.compose(lambda *a, **kw: called.append(a) or "the primitive's")
        assert composed(*args[name]) == "the primitive's" and len(called) == 1, name
    assert torch.equal(OPS["linear_tanh"].compose()(x, w, b), torch.tanh(F.linear(x, w, b)))
    assert OPS["post_ln_layers"].compose()(x, [], [], 2, 0.3, 1e-12, "gelu") is None
    k16 = Kernels.resolve("cpu", torch.float16, 64)  # no oneDNN fp16 path: every fused op composed
    assert {k16.names[n] for n in FUSED_OPS if n in k16.names} == {"composed(torch)"}


def test_named_onednn_backend_runs_with_the_torch_primitives():
    """backend="onednn" runs on the CPU: its fused ops and embedding, the torch backend's other primitives; same
    result as auto (which picks the same) and as transformers."""
    import padfree
    from family_zoo import LENGTHS, batch, make, max_diff
    model = make("bert", 0)
    enc = padfree.from_pretrained(model, backend="onednn")
    assert {enc.kernels.names[op] for op in ("qkv_varlen_attention", "linear_bias_act",
                                             "linear_residual_layer_norm", "embed_layer_norm")} == {"onednn"}
    assert {enc.kernels.names[op] for op in ("varlen_attention", "bias_act")} == {"torch"}
    ids, mask, types, kw = batch(model, LENGTHS, "right")
    out = enc(ids, mask, types).last_hidden_state
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    assert max_diff(out, ref, mask) <= 1e-4
    assert torch.equal(out, padfree.from_pretrained(model)(ids, mask, types).last_hidden_state)


def test_named_onednn_backend_that_cannot_run_says_why():
    with pytest.raises(ValueError, match=r"onednn: .*dtype torch.float16"):
        Kernels.resolve("cpu", torch.float16, 64, backend="onednn")
    with pytest.raises(ValueError, match=r"onednn: .*device cuda"):
        Kernels.resolve("cuda", torch.float32, 64, backend="onednn")


@pytest.mark.parametrize("lengths", [[7], [5, 40, 1, 17, 2, 9, 40]], ids=["small-batch-path", "large-batch-path"])
def test_a_parameter_replaced_on_a_live_encoder_is_used_at_once(lengths):
    """The forward reads each layer's parameters afresh (``EncoderLayer.tensors``), and the packed copies follow
    the parameter object: a weight or LayerNorm bias assigned after the first forward must be used by the next
    one, on the MKL small-batch path and the oneDNN one, as transformers uses it."""
    import padfree
    from family_zoo import batch, make, max_diff
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    ids, mask, types, kw = batch(model, lengths, "right")
    enc(ids, mask, types)  # packs the weights of the path
    g = torch.Generator().manual_seed(3)
    ffn_in = torch.randn(enc.layers[0].ffn_in.weight.shape, generator=g) * 0.2
    ln_bias = torch.randn(enc.layers[1].attn_norm.bias.shape, generator=g)
    enc.layers[0].ffn_in.weight = torch.nn.Parameter(ffn_in.clone(), requires_grad=False)
    enc.layers[1].attn_norm.bias = torch.nn.Parameter(ln_bias.clone(), requires_grad=False)
    hf = model.encoder.layer  # replaced too (padfree may share the old tensors' storage with it)
    hf[0].intermediate.dense.weight = torch.nn.Parameter(ffn_in, requires_grad=False)
    hf[1].attention.output.LayerNorm.bias = torch.nn.Parameter(ln_bias, requires_grad=False)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
    assert max_diff(enc(ids, mask, types).last_hidden_state, ref, mask) <= 1e-4
