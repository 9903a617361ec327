"""int8 products (``dtype="int8"``): the native product against float64, the models against their fp32 selves.

- The product: ``int8_linear`` against a float64 product of the same quantized operands (the packing's int8 weight
  and scales, ``quantize_rows``' values and scales), at odd sizes, with each epilogue (bias, activation, residual),
  8-bit and the default 12-bit activations, and at the largest K whose int32 sums the levels keep exact.
- The operands: ``pack_int8`` against a quantization written here (per output column, max|w| / 127), the rows'
  values within half a step of ``x / scale`` and reaching the levels.
- Models: random-weight BERT, XLM-R, MPNet, DeBERTa, ALBERT and ModernBERT (pre-LN) shapes through the int8 backend
  and the native int8 stack, cosine to their fp32 output; the real all-MiniLM-L6-v2 on the W2 paragraphs: every
  text's cosine >= 0.99, the mean >= 0.995, the top-10 neighbours of each query overlapping fp32's by >= 90%; a
  classification head keeps fp32's argmax on >= 99% of inputs.
- The load gate refuses a model int8 breaks; int8 on a GPU, under a CPU plan without the kernels, or with a backend
  that has no int8 products is refused by name; the CLI job and the server run int8.
"""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import padfree
from padfree import cpu
from padfree.batch import PackedBatch
from padfree.ops import native
from padfree.ops.registry import select

from family_zoo import build_family, make
from serving import Server, classifier_dir, minilm_path

PLAN = cpu.current()
pytestmark = pytest.mark.skipif(not PLAN.int8_isa or native.module() is None,
                                reason=f"no int8 products here: {PLAN.reasons['int8_isa']}; "
                                       f"native module: {native.why_not()}")
ISA = PLAN.int8_isa


def _reference(x, packed, scales, K, bias, levels):
    """float64 ``xq @ wq^T * sx * sw + bias`` of the operands the kernel multiplies: ``(y, xq, sx)``."""
    mod = native.module()
    xq, sx = mod.quantize_rows(x, levels, ISA)
    N = scales.numel()
    wq = packed.permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * 2)[:N, :K]  # [N, K] int8 from the panels
    y = (xq[:, :K].double() @ wq.double().T) * sx.double()[:, None] * scales.double()[None, :]
    return (y if bias is None else y + bias.double()), xq, sx


@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (5, 33, 16), (7, 64, 37), (13, 384, 1536), (50, 1537, 48),
                                   (130, 96, 100)])
@pytest.mark.parametrize("levels", [127, None])
def test_product_matches_float64_of_its_quantized_operands(M, K, N, levels):
    mod = native.module()
    g = torch.Generator().manual_seed(M * 1000 + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    x[0, 0] = 9.0  # an outlier sets the row's scale
    bias, residual = torch.randn(N, generator=g), torch.randn(M, N, generator=g)
    packed, scales = mod.pack_int8(w)
    ref, _, _ = _reference(x, packed, scales, K, bias, 127 if levels is None else levels)
    if levels is None:  # the default: 12-bit activations
        ref, _, _ = _reference(x, packed, scales, K, bias, 2047)
    tol = 1e-6 * ref.abs().max().item()  # int32 sums exact; the dequantization in fp32
    y = mod.int8_linear(x, packed, scales, N, bias, "none", None, levels, ISA)
    assert (y.double() - ref).abs().max().item() <= tol
    for activation, fn in (("gelu", torch.nn.functional.gelu), ("relu", torch.relu), ("silu", torch.nn.functional.silu)):
        y = mod.int8_linear(x, packed, scales, N, bias, activation, residual, levels, ISA)
        assert (y.double() - (fn(ref) + residual.double())).abs().max().item() <= 4 * tol + 1e-5
    y = mod.int8_linear(x, packed, scales, N, None, "none", None, levels, ISA)  # no bias
    assert (y.double() - (ref - bias.double())).abs().max().item() <= tol
    # and it is a quantized product: near the fp32 one, not equal to it
    exact = x.double() @ w.double().T + bias.double()
    err = ((y.double() + bias.double() - exact).norm() / exact.norm()).item()
    assert 0 < err < (0.02 if levels == 127 else 0.01)


def test_int32_sums_stay_exact_at_the_levels_bound():
    """At K = 9000 the default levels shrink below 12 bits so that K * 127 * levels < 2^31: every value at its
    extreme still sums exactly."""
    mod = native.module()
    K, M, N = 9000, 3, 20
    x = torch.ones(M, K)
    x[1] = -1.0
    w = torch.ones(N, K)
    w[3] = -1.0
    packed, scales = mod.pack_int8(w)
    y = mod.int8_linear(x, packed, scales, N, None, "none", None, None, ISA)
    ref, xq, _ = _reference(x, packed, scales, K, None, (2**31 - 1) // (127 * K))
    assert xq.abs().max().item() == (2**31 - 1) // (127 * K) < 2047
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=0)
    assert torch.allclose(y.double(), x.double() @ w.double().T, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="K \\* 127 \\* levels < 2\\^31"):
        mod.quantize_rows(x, 2047, ISA)


def test_quantized_operands():
    mod = native.module()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 45, generator=g)
    w[5] = 0.0  # an all-zero column: scale 1, values 0
    packed, scales = mod.pack_int8(w)
    amax = w.abs().amax(1)
    expected_scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    assert torch.equal(scales, expected_scales)
    wq = packed.permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * 2)
    assert packed.shape == (3, 23, 16, 2) and packed.dtype == torch.int8
    assert torch.equal(wq[:37, :45].float(), torch.round(w / expected_scales[:, None]))
    assert wq[37:].abs().sum() == 0 and wq[:, 45:].abs().sum() == 0  # padding
    x = torch.randn(9, 45, generator=g) * 3
    x[4] = 0.0
    for levels in (127, 2047):
        xq, sx = mod.quantize_rows(x, levels, ISA)
        assert xq.dtype == torch.int16 and xq.shape == (9, 46) and xq[:, 45].abs().sum() == 0
        rows = [r for r in range(9) if r != 4]
        assert torch.allclose(sx[rows], x[rows].abs().amax(1) / levels, rtol=1e-6)
        assert sx[4] == 1 and xq[4].abs().sum() == 0
        assert (xq[rows, :45].double() - x[rows].double() / sx[rows, None].double()).abs().max() <= 0.5 + 1e-3
        assert torch.equal(xq[rows].abs().amax(1), torch.full((8,), levels, dtype=torch.int16))


# ---------------------------------------------------------------------------------------------- models
def _pooled_cosines(model, lengths=(1, 5, 17, 40, 23, 8), vocab=60) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-sequence cosine (mean-pooled) and per-token cosine of the int8 encoder's output to the fp32 one's."""
    fp32, int8 = padfree.from_pretrained(model, dtype="fp32"), padfree.from_pretrained(model, dtype="int8")
    g = torch.Generator().manual_seed(3)
    batch = PackedBatch.from_sequences([torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths])
    a, b = fp32.forward_packed(batch).double(), int8.forward_packed(batch).double()
    assert not torch.equal(a, b)  # the products were quantized
    cu = batch.cu_seqlens.tolist()
    pool = lambda h: torch.stack([h[i:j].mean(0) for i, j in zip(cu[:-1], cu[1:])])  # noqa: E731
    return (torch.nn.functional.cosine_similarity(pool(a), pool(b)), torch.nn.functional.cosine_similarity(a, b),
            int8.kernels.names)


@pytest.mark.parametrize("family,shape", [("bert", 0), ("bert", 1), ("xlm-roberta", 1), ("mpnet", 1),
                                          ("deberta-v2", 0), ("deberta-v2", 1), ("albert", 1)])
def test_random_weight_families_keep_their_output(family, shape):
    sequences, tokens, names = _pooled_cosines(make(family, shape))
    assert {op: names[op] for op in ("qkv_varlen_attention", "linear_bias_act", "linear_residual_layer_norm")} \
        == dict.fromkeys(("qkv_varlen_attention", "linear_bias_act", "linear_residual_layer_norm"), "int8")
    # measured on the AVX2 EPYC: >= 0.9996 per sequence, >= 0.9997 per token (NOTES.md section 26)
    assert sequences.min() >= 0.999 and tokens.min() >= 0.999


def test_pre_ln_layers_quantize_their_output_products():
    """ModernBERT's pre-LN layers add their attention-out and FFN-out products to the residual stream through
    linear_residual, which the int8 backend runs."""
    model = build_family("modernbert", 1)[0]
    sequences, tokens, names = _pooled_cosines(model)
    assert names["linear_residual"] == "int8" and names["linear_gated_act"] == "int8"
    assert sequences.min() >= 0.999 and tokens.min() >= 0.999


def test_the_native_stack_and_the_layers_one_by_one_agree():
    """A plain BERT runs its int8 layers in one native call; the layer-by-layer path (the same products, PyTorch's
    attention and LayerNorm) gives the same output within a quantization step: an input that differs in its last
    fp32 bit between the two may round to the neighbouring level."""
    enc = padfree.from_pretrained(make("bert", 1), dtype="int8")
    g = torch.Generator().manual_seed(5)
    batch = PackedBatch.from_sequences([torch.randint(3, 60, (n,), generator=g).tolist() for n in (3, 40, 12)])
    stacked = enc.forward_packed(batch)
    stack = enc.kernels.post_ln_layers
    enc.kernels.post_ln_layers = lambda *args: None  # the encoder then runs each layer
    try:
        layered = enc.forward_packed(batch)
    finally:
        enc.kernels.post_ln_layers = stack
    assert (stacked - layered).abs().max().item() < 1e-2
    assert torch.nn.functional.cosine_similarity(stacked.double(), layered.double()).min().item() > 0.99999


@pytest.fixture(scope="module")
def minilm_vectors():
    from padfree.bench.corpus import stdlib_paragraphs
    texts = stdlib_paragraphs()[:400]
    fp32 = padfree.SentenceEncoder.from_pretrained(minilm_path(), dtype="fp32").encode(texts)
    int8 = padfree.SentenceEncoder.from_pretrained(minilm_path(), dtype="int8").encode(texts)
    return fp32, int8


def test_minilm_on_real_text_keeps_vectors_and_ranking(minilm_vectors):
    a, b = minilm_vectors
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # the gates; measured here: min 0.9986, mean 0.9996 (NOTES.md section 26)
    assert cos.min() >= 0.99 and cos.mean() >= 0.995
    queries = 100
    overlap = []
    for sims in (a[:queries] @ a.T, b[:queries] @ b.T):
        sims[np.arange(queries), np.arange(queries)] = -np.inf  # a query is not its own neighbour
        overlap.append(np.argsort(-sims, axis=1)[:, :10])
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(*overlap)]) >= 0.9


def test_an_int8_model_keeps_no_float_packing_of_its_weights():
    """The int8 packing is the only packed copy an int8 model's products need: neither the load gate's float run
    nor a forward leaves an fp32 (oneDNN, MKL, native) packing of a weight cached beside it."""
    from padfree.ops import onednn_backend
    enc = padfree.from_pretrained(minilm_path(), dtype="int8")
    enc.forward_packed(PackedBatch.from_sequences([[101, 2000, 102], list(range(1000, 1300))]))
    ids = {id(p) for p in enc.parameters()}
    layouts = {layout for (i, layout) in onednn_backend._packed if i in ids}
    assert layouts == {"int8"}


def test_a_classifier_keeps_its_argmax(tmp_path):
    from padfree.bench.corpus import stdlib_paragraphs
    from transformers import AutoTokenizer
    path = classifier_dir(tmp_path / "clf", num_labels=5, seed=3)
    texts = [p[:300] for p in stdlib_paragraphs()[:300]]
    enc = AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=128,
                                              return_tensors="pt")
    fp32, int8 = (padfree.SequenceClassifier.from_pretrained(path, dtype=d)(enc["input_ids"], enc["attention_mask"]).logits
                  for d in ("fp32", "int8"))
    assert (fp32.argmax(1) == int8.argmax(1)).float().mean().item() >= 0.99
    assert not torch.equal(fp32, int8)


# ---------------------------------------------------------------------------------------------- refusals
def test_the_load_gate_refuses_a_model_int8_breaks():
    """An FFN-in weight whose every row holds a large value at an input the LayerNorm before it zeroes: fp32 never
    sees it, int8's per-row scale rounds every other weight of the row to 0. The load check refuses the model."""
    model = make("bert", 1)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.output.LayerNorm.weight[0] = 0.0
            layer.attention.output.LayerNorm.bias[0] = 0.0
            layer.intermediate.dense.weight[:, 0] = 1e4
    padfree.from_pretrained(model, dtype="fp32")  # fine in fp32
    with pytest.raises(ValueError, match=r"int8 products change this model's output too much \(cosine to the "
                                         r"float output: min 0\.\d+ \(gate 0\.99\)"):
        padfree.from_pretrained(model, dtype="int8")


def test_int8_is_refused_where_it_cannot_run():
    model = make("bert", 0)
    with pytest.raises(ValueError, match="dtype int8 runs on the CPU only"):
        padfree.from_pretrained(model, dtype="int8", device="cuda")
    with pytest.raises(ValueError, match="onednn: no int8 products"):
        padfree.from_pretrained(model, dtype="int8", backend="onednn")
    sse = cpu.plan_for(cpu.EXAMPLES["x86-sse"])
    assert not sse.int8_isa
    with pytest.raises(ValueError, match="int8 products need the native module's AVX2 kernels"):
        select("linear_bias_act", "cpu", torch.float32, plan=sse, products="int8")
    for name in ("zen3", "zen4", "sapphire-rapids"):
        assert cpu.plan_for(cpu.EXAMPLES[name]).int8_isa == "avx2"
    assert not cpu.plan_for(cpu.EXAMPLES["zen3"], cpu.Settings(native=False)).int8_isa
    with pytest.raises(ValueError, match="unknown products 'int4'"):
        select("linear_bias_act", "cpu", torch.float32, products="int4")


# ---------------------------------------------------------------------------------------------- front doors
def test_the_cli_job_and_the_server_run_int8(tmp_path):
    texts = ["int8 weights, twelve-bit activations", "a longer text about padding-free inference " * 5, "x"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "padfree.cli", "embed", str(tmp_path / "in.parquet"), str(out),
                          "--model", str(minilm_path()), "--dtype", "int8"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "_manifest.json").read_text())["options"]["dtype"] == "int8"
    job = np.stack(pq.read_table(sorted(out.glob("*.parquet"))[0])["embedding"].to_numpy(zero_copy_only=False))
    library = padfree.SentenceEncoder.from_pretrained(minilm_path(), dtype="int8").encode(texts)
    fp32 = padfree.SentenceEncoder.from_pretrained(minilm_path(), dtype="fp32").encode(texts)
    assert np.abs(job - library).max() < 1e-5
    assert ((job * fp32).sum(1) / np.linalg.norm(job, axis=1) / np.linalg.norm(fp32, axis=1)).min() >= 0.99
    server = Server(["--model", f"m={minilm_path()}", "--dtype", "int8"], tmp_path / "server.log")
    try:
        got = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": texts}, timeout=60).json()
        served = np.array([d["embedding"] for d in got["data"]])
        assert np.abs(served - library).max() < 1e-5
        assert httpx.get(server.url + "/info", timeout=30).json()["model_dtype"] == "int8"
    finally:
        assert server.stop() == 0
