"""The native small-batch stack (``padfree.ops.native``, ``small_layers.cpp``): its product, attention, activation,
residual-add-and-LayerNorm and embedding kernels against float64; where the stack applies it gives the Python
forward's result (fp32) or the fp32 forward's on the bf16-rounded weights (bf16) within rounding, and transformers'
within the family tolerances; it is really taken there; it follows parameters replaced or updated in place; a build
that fails leaves the Python forward in charge. Paths are reached through CPU plans (padfree.cpu), never by
patching module state."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import padfree
from family_zoo import BF16_ATOL, batch, bf16_errors, hf_hidden, make, max_diff
from padfree import cpu
from padfree.ops import native
from padfree.ops.onednn_backend import stack_path

PLAN = cpu.current()  # this CPU's plan; tests of other paths replace what they change

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


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f"{f}-{s}" for f, s in FAMILIES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_stack_matches_the_python_forward_and_transformers(family, shape, layout):
    """This CPU's plan: each batch the stack takes (on its own product, MKL's or oneDNN's) gives transformers'
    result and the Python forward's (the plan without native code) within fp32 rounding."""
    _check_stack(family, shape, layout, PLAN)


@pytest.mark.parametrize("isa", ["avx2", "aten"])
@pytest.mark.parametrize("layout", ["mixed", "64", "128"])
def test_native_stack_on_every_instruction_set_this_cpu_runs(isa, layout):
    """The stack on the other kernel sets this CPU runs than its plan's (an AVX-512 machine runs the AVX2 kernels
    too; "aten": ATen's ops with MKL's products to 64 rows), for one family."""
    if isa == PLAN.native_isa or (isa != "aten" and not native.module().cpu_runs(isa)):
        pytest.skip(f"{isa} is this CPU's plan (tested above)" if isa == PLAN.native_isa else f"this CPU lacks {isa}")
    _check_stack("bert", 1, layout, PLAN.replace(native_isa=isa, **({"mkl_small_rows": 64} if isa == "aten" else {})))


def _check_stack(family, shape, layout, plan):
    if stack_path(torch.float32, sum(LAYOUTS[layout]), plan) is None:
        pytest.skip(f"the fp32 stack does not take {sum(LAYOUTS[layout])} tokens under this plan")
    model = make(family, shape)
    enc = padfree.from_pretrained(model).prepare(plan=plan)
    ids, mask, types, kw = batch(model, LAYOUTS[layout], "right")
    packed = enc.pack(ids, mask, types)
    with torch.inference_mode():  # the stack is taken for this batch (not the layer-by-layer fallback)
        x = enc._embed(packed)
        assert enc.kernels.post_ln_layers(x, list(enc.layers), packed.runs, enc.config.num_heads,
                                          enc.config.attention_scale, enc.config.layer_norm_eps,
                                          enc.config.activation) is not None
    out = enc(ids, mask, types).last_hidden_state
    assert max_diff(out, hf_hidden(model, ids, mask, kw), mask) <= 1e-4
    enc.prepare(plan=plan.replace(native_isa=""))  # the Python forward: the same products, within fp32 rounding
    assert max_diff(out, enc(ids, mask, types).last_hidden_state, mask) <= 1e-5


def _fp32_stack_rows(plan) -> int:
    """The most tokens the fp32 stack takes under a plan (its own product, MKL's or oneDNN's)."""
    return max(n for n in range(1, 513) if stack_path(torch.float32, n, plan) is not None)


def _stack(enc, x, runs):
    cfg = enc.config
    with torch.inference_mode():
        return enc.kernels.post_ln_layers(x, list(enc.layers), runs, cfg.num_heads, cfg.attention_scale,
                                          cfg.layer_norm_eps, cfg.activation)



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
def test_bf16_stack_is_the_fp32_stack_on_the_bf16_weights(family, shape, layout, kernel):
    """A bf16 model's small batch runs the fp32 stack on its bf16 weights, on either product kernel. On fp32 FMAs
    of the widened weights it gives the float64 stack's result on the bf16 weights to within the final bf16
    rounding. On bf16 dot products each product's input is rounded to bf16 first, and roundings that flip on
    fp32 noise spread through the layers, so its error may be at most twice what that rounding costs the float64
    stack (the bf16 rule's form). The whole forward keeps the bf16 rule against transformers."""
    if kernel == "dot" and not native.module().cpu_runs("avx512_bf16"):
        pytest.skip("this CPU lacks AVX-512 BF16 (the dot kernel's instructions)")
    if PLAN.native_isa not in ("avx512", "avx2"):
        pytest.skip(f"no native kernels under this CPU's plan ({PLAN.reasons['native_isa']})")
    plan = PLAN.replace(bf16_dot=kernel == "dot", native_isa="avx512" if kernel == "dot" else PLAN.native_isa)
    model = make(family, shape)
    enc = padfree.from_pretrained(model, dtype=torch.bfloat16).prepare(plan=plan)
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
    """Above the stack's limits (fp32: the largest of the plan's own_product_rows, mkl_small_rows and
    onednn_stack_rows, bf16: bf16_native_rows), in fp16 and for layers with relative terms, the encoder runs layer
    by layer."""
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    cfg = enc.config
    fp32_rows = _fp32_stack_rows(PLAN) + 1
    bf16_rows = PLAN.bf16_native_rows + 1
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
    if not PLAN.native_isa:
        pytest.skip("PADFREE_NATIVE=0 in this process's plan")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "module None" in run.stdout and "why None" not in run.stdout, run.stdout
    assert float(run.stdout.split("diff ")[1]) <= 1e-4
    assert run.stderr.count("native small-batch layers unavailable") == 1, run.stderr[-2000:]


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


def test_a_cpu_forward_pins_torchs_workers_one_per_cpu():
    """Where the process may run on exactly as many CPUs as torch has threads, a CPU forward pins the OpenMP workers
    of its calling thread each to its own CPU and leaves the caller free; a plan without pinning
    (PADFREE_PIN_THREADS=0) leaves them all free."""
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
    enc.prepare(plan=PLAN.replace(pin_threads=False))
    caller, new = _forward_in_a_new_thread(enc, ids, mask)
    assert all(cpus == allowed for cpus in new.values()), new
