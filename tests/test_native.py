"""The native small-batch stack (``padfree.ops.native``, ``small_layers.cpp``): where it applies it gives the Python
forward's result to the bit and transformers' within fp32 rounding; it is really taken there; a build that fails
leaves the Python forward in charge; ``PADFREE_NATIVE`` is checked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import padfree
from family_zoo import batch, hf_hidden, make, max_diff
from padfree.ops import native

# plain post-LN families and their activations: erf GELU, tanh GELU, ReLU; ALBERT shares layers (its schedule)
FAMILIES = [("bert", 0), ("bert", 1), ("roberta", 1), ("distilbert", 1), ("albert", 1), ("electra", 0)]
# batches of at most SMALL_ROWS = 64 tokens: one sequence, one token, runs of equal lengths, mixed runs, the limit
LAYOUTS = {"one": [7], "one-token": [1], "equal-runs": [5, 5, 5, 2], "mixed": [3, 9, 9, 1, 12, 4],
           "limit": [40, 24]}


def test_the_native_module_builds_here():
    """CI has a compiler: the module must build (a broken source must fail CI, not fall back unnoticed)."""
    assert native.module() is not None, native.why_not()


@pytest.mark.parametrize("family,shape", FAMILIES, ids=[f"{f}-{s}" for f, s in FAMILIES])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_stack_matches_the_python_forward_and_transformers(family, shape, layout, monkeypatch):
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
    monkeypatch.setenv("PADFREE_NATIVE", "0")  # the Python forward: the same ATen calls, the same bits
    assert torch.equal(out, enc(ids, mask, types).last_hidden_state)


def test_native_stack_is_not_taken_where_it_does_not_apply():
    """Above the small-batch limit, in bf16 and for layers with relative terms, the encoder runs layer by layer."""
    model = make("bert", 0)
    enc = padfree.from_pretrained(model)
    cfg = enc.config
    for x in (torch.randn(65, cfg.hidden_size), torch.randn(8, cfg.hidden_size, dtype=torch.bfloat16)):
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
