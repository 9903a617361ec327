"""The systems W1 compares, each built once per (model, dtype, device) and then called per batch.

Every builder returns a callable ``(case) -> output [B, S, H]`` or raises :class:`Skip` with the reason it
cannot run here (missing package, no GPU, unsupported dtype or family); the report lists those reasons.
All systems get the same weights (one Hugging Face model with random weights from the seed) and the same
padded inputs; padfree is timed through its Hugging Face-compatible call, so packing and the padded output
it rebuilds are inside its time, as they are for the padding-free baseline.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
INT8 = torch.int8  # each system in its own int8 form: padfree dtype="int8", transformers with torch's dynamic int8
                   # Linear (Infinity's --dtype int8), ORT's quantize_dynamic, OpenVINO with NNCF's int8 weights


ONLY_BESIDE = {"padfree-fp32": "int8"}  # systems built for one dtype's table only (no skipped rows elsewhere)


class Skip(Exception):
    """A system that cannot run here; the message is the reason shown in the report."""


Runner = Callable[[object], torch.Tensor]


def _hf(model, dtype, device, attn: str):
    m = copy.deepcopy(model).to(device=device, dtype=torch.float32 if dtype == INT8 else dtype)
    try:
        m.set_attn_implementation(attn)
    except ValueError as e:  # e.g. DeBERTa has no sdpa attention in transformers
        raise Skip(f"transformers has no {attn!r} attention for {type(m).__name__}: {str(e).split('.')[0]}") from None
    return m.eval()


def _call_hf(m, device) -> Runner:
    @torch.inference_mode()
    def run(case):
        return m(input_ids=case.input_ids.to(device), attention_mask=case.attention_mask.to(device)).last_hidden_state
    return run


def build_padfree(model, dtype, device) -> Runner:
    import padfree
    try:
        enc = padfree.from_pretrained(model, dtype=dtype, device=device)
    except ValueError as e:
        raise Skip(f"padfree does not load this family yet: {e}") from None

    def run(case):
        return enc(input_ids=case.input_ids.to(device), attention_mask=case.attention_mask.to(device)).last_hidden_state
    run.encoder = enc
    return run


def build_padfree_fp32(model, dtype, device) -> Runner:
    """padfree fp32, run beside padfree int8 (the int8 table's reference for speed and accuracy)."""
    if dtype != INT8:
        raise Skip("runs beside int8 only (padfree fp32 is the padfree row of the fp32 table)")
    return build_padfree(model, torch.float32, device)


def _no_int8(dtype, name: str) -> None:
    if dtype == INT8:
        raise Skip(f"{name} has no int8 form here (transformers' int8 is the hf-sdpa row: torch's dynamic int8 Linear)")


def build_hf_eager(model, dtype, device) -> Runner:
    _no_int8(dtype, "transformers eager")
    return _call_hf(_hf(model, dtype, device, "eager"), device)


def build_hf_sdpa(model, dtype, device) -> Runner:
    """transformers sdpa; int8: every Linear swapped for torch's dynamic int8 one (``quantize_dynamic``, per-tensor
    activations: what Infinity's ``--dtype int8`` runs)."""
    m = _hf(model, dtype, device, "sdpa")
    if dtype == INT8:
        if device != "cpu":
            raise Skip("torch's dynamic int8 Linear runs on the CPU only")
        m = torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    return _call_hf(m, device)


def build_hf_sdpa_compiled(model, dtype, device, allowed: bool = True, why_not: str = "") -> Runner:
    """``torch.compile`` (inductor, dynamic shapes so one compilation serves every length) of HF sdpa.
    The compilation happens in the warm-up call, whose time the report shows."""
    if not allowed:
        raise Skip(why_not)
    _no_int8(dtype, "torch.compile of transformers")
    m = _hf(model, dtype, device, "sdpa")
    compiled = torch.compile(m, dynamic=True)
    return _call_hf(compiled, device)


class _OrtExport(torch.nn.Module):
    """HF model with the classic additive ``[B, 1, 1, S]`` mask, so the exported graph masks pads correctly
    (transformers 5 drops an all-ones mask while tracing)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0  # [B, 1, 1, S]
        return self.model(input_ids=input_ids, attention_mask=ext).last_hidden_state


def build_ort(model, dtype, device, shape_name: str, log=print) -> Runner:
    """ONNX Runtime on the graph exported from the same model and run through ORT's BERT optimizer
    (``onnxruntime.transformers.optimizer``, model_type bert): fused SkipLayerNorm and BiasGelu; padded."""
    try:
        import onnxruntime as ort
        from onnxruntime.transformers.optimizer import optimize_model
        import onnx  # noqa: F401  (the exporter and the optimizer need it)
    except ImportError as e:
        raise Skip(f"missing package: {e.name} (pip install padfree[bench])") from None
    provider = "CUDAExecutionProvider" if device.startswith("cuda") else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise Skip(f"onnxruntime has no {provider} (installed: {ort.get_available_providers()})")
    if device == "cpu" and dtype not in (torch.float32, INT8):
        raise Skip("ONNX Runtime's CPU provider has no bf16/fp16 kernels for BERT (MatMul, Attention); fp32 and int8")
    if dtype == INT8 and device != "cpu":
        raise Skip("ONNX Runtime's dynamic int8 runs on its CPU provider")
    cfg = model.config
    tmp = tempfile.mkdtemp(prefix="padfree-ort-")
    raw, opt_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model_opt.onnx")
    t0 = time.perf_counter()
    ids = torch.randint(1, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # a real pad, so that the masking path is traced
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_OrtExport(copy.deepcopy(model).float().eval()).eval(), (ids, mask), raw,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask",
                                                                           "last_hidden_state")},
                          opset_version=17, dynamo=False)
    opt = optimize_model(raw, model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size,
                         use_gpu=device.startswith("cuda"))
    if dtype == torch.float16:
        opt.convert_float_to_float16(keep_io_types=True)
    opt.save_model_to_file(opt_path)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if dtype == INT8:
        opt_path = _ort_int8(opt_path, log)
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    # Systems take turns on the same cores. ORT's workers otherwise spin after each run and keep those cores
    # busy while the next system is timed (measured: padfree at batch 1, max 64 went from 75 to 135 ms when it
    # ran after ORT); without spinning each system is timed on idle cores.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(opt_path, so, providers=[provider])
    log(f"  ORT: exported and optimized in {time.perf_counter() - t0:.1f}s; fused ops {fused}")

    def run(case):
        feed = {"input_ids": case.input_ids.numpy(), "attention_mask": case.attention_mask.numpy()}
        return torch.from_numpy(session.run(None, feed)[0])
    run.fused_ops = fused
    return run


_OV_MODELS: dict[int, tuple[object, object]] = {}  # id(HF model) -> (the model, its converted ov.Model)


def openvino_precision(dtype) -> str | None:
    """The ``INFERENCE_PRECISION_HINT`` OpenVINO is given for a padfree dtype: fp32 -> ``"f32"``; bf16 -> none
    (OpenVINO's own default on this CPU, bf16 where the CPU has it: what an OpenVINO user gets)."""
    return {torch.float32: "f32", torch.bfloat16: None}.get(dtype, "unsupported")


def _ov_type(t) -> str:
    """An OpenVINO element type in padfree's names (f32 -> fp32)."""
    name = t.get_type_name() if hasattr(t, "get_type_name") else str(t)
    return {"f32": "fp32", "f16": "fp16"}.get(name, name)


def _ort_int8(path: str, log) -> str:
    """ORT's dynamic quantization of the optimized graph, as sentence-transformers exports its ``qint8`` models:
    int8 weights per channel, activations quantized per tensor at run time; ``reduce_range`` (7-bit weights) on a
    CPU without VNNI, whose u8 x s8 products saturate otherwise (NOTES.md section 25)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from padfree import cpu
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu.current().profile.features)
    out = path.replace(".onnx", "_qint8.onnx")
    quantize_dynamic(path, out, weight_type=QuantType.QInt8, per_channel=True, reduce_range=not vnni,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # the fused ops' outputs
    log(f"  ORT: quantize_dynamic QInt8, per channel, reduce_range={not vnni}")
    return out


def build_openvino(model, dtype, device, log=print) -> Runner:
    """OpenVINO on the CPU: ``openvino.convert_model`` of the same transformers model (traced with a padded
    example, so the mask is applied), reshaped to dynamic ``[-1, -1]`` inputs (one compiled model serves every
    batch and length, what a server would deploy), compiled with ``PERFORMANCE_HINT=LATENCY`` (one
    synchronous request uses every thread) and as many threads as torch. fp32: ``INFERENCE_PRECISION_HINT=f32``;
    bf16: OpenVINO's default precision on this CPU (reported with the row). Padded inputs, like HF and ORT."""
    try:
        import openvino as ov
    except ImportError:
        raise Skip("missing package: openvino (pip install padfree[bench])") from None
    if not str(device).startswith("cpu"):
        raise Skip("the OpenVINO baseline runs on OpenVINO's CPU device only")
    hint = openvino_precision(dtype)
    if dtype == INT8:
        try:
            import nncf
        except ImportError:
            raise Skip("missing package: nncf (pip install padfree[bench]): OpenVINO's int8 weights") from None
        hint = "f32"
    if hint == "unsupported":
        raise Skip(f"OpenVINO is compared in fp32 and in its default precision (against padfree bf16), not {dtype}")
    core = ov.Core()
    default = _ov_type(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    if hint is None and default != "bf16":
        log(f"  openvino: default precision on this CPU is {default}, not bf16")
    t0 = time.perf_counter()
    cached = _OV_MODELS.get(id(model))
    if cached is None or cached[0] is not model:
        ids = torch.randint(1, 100, (2, 16))
        mask = torch.ones_like(ids)
        mask[0, 10:] = 0  # a real pad, so that the masking path is traced
        src = copy.deepcopy(model).float().eval()
        import warnings
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                ov_model = ov.convert_model(src, example_input={"input_ids": ids, "attention_mask": mask})
        except Exception as e:  # noqa: BLE001 - the reason is the result
            raise Skip(f"openvino.convert_model failed for {type(model).__name__}: {str(e).splitlines()[0][:200]}") from None
        ov_model.reshape({i.get_any_name(): ov.PartialShape([-1, -1]) for i in ov_model.inputs})
        _check_openvino(core, ov_model, src)
        _OV_MODELS.clear()
        _OV_MODELS[id(model)] = (model, ov_model)
    ov_model = _OV_MODELS[id(model)][1]
    if dtype == INT8:  # NNCF's data-free int8 weight compression (asymmetric per channel); activations fp32
        ov_model = nncf.compress_weights(ov_model.clone())
        log("  openvino: nncf.compress_weights (INT8_ASYM weights)")
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = core.compile_model(ov_model, "CPU", config)
    precision = _ov_type(compiled.get_property("INFERENCE_PRECISION_HINT"))
    request = compiled.create_infer_request()
    names = [i.get_any_name() for i in compiled.inputs]
    out_port = compiled.outputs[0]
    log(f"  openvino: converted and compiled in {time.perf_counter() - t0:.1f}s; precision {precision}, "
        f"dynamic shapes [-1, -1], {config}")

    def run(case):
        feed = {"input_ids": case.input_ids.numpy(), "attention_mask": case.attention_mask.numpy()}
        res = request.infer({n: feed[n] for n in names})
        return torch.from_numpy(res[out_port].copy())
    run.precision = f"int8 weights, {precision}" if dtype == INT8 else precision
    run.compiled = compiled
    return run


def _check_openvino(core, ov_model, src) -> None:
    """The converted model in fp32 against the transformers model on the real tokens of a padded batch of
    another shape than the traced example: a conversion that computes something else is skipped with the reason,
    never timed. (ModernBERT converted from its sdpa attention gives NaN on padded batches with OpenVINO 2026.4;
    from eager attention it is exact.)"""
    n = min(300, getattr(src.config, "max_position_embeddings", 512) - 2)  # past a ModernBERT window (128)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, n), generator=g)
    mask = (torch.arange(n)[None, :] < torch.tensor([n, n // 2 + 1, 3])[:, None]).long()
    ids = ids * mask  # pad id 0, as the benchmark cases have it
    compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [i.get_any_name() for i in compiled.inputs]
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    out = torch.from_numpy(compiled({n: feed[n] for n in names})[compiled.outputs[0]].copy())
    with torch.no_grad():
        ref = src(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    err = (out[real] - ref[real]).abs().max().item()
    if not err <= 1e-3 * max(1.0, ref[real].abs().max().item()):  # also catches NaN
        raise Skip(f"openvino's conversion of {type(src).__name__} ({src.config._attn_implementation} attention) "
                   f"differs from transformers on a padded batch: max abs error {err:.3g}")


class PackedTorchBert:
    """The padding-free PyTorch peer: BERT on packed tokens with ``torch.nn.attention.varlen.varlen_attn``
    (FlashAttention's varlen kernel; CUDA only), stock ``F.linear``/``F.layer_norm``/``F.gelu`` elsewhere."""

    def __init__(self, model, dtype, device):
        from torch.nn.attention.varlen import varlen_attn
        self.varlen_attn = varlen_attn
        m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
        self.emb, self.layers, self.cfg, self.device = m.embeddings, m.encoder.layer, m.config, device

    @torch.inference_mode()
    def __call__(self, case) -> torch.Tensor:
        ids, mask = case.input_ids.to(self.device), case.attention_mask.to(self.device)
        B, S = ids.shape
        lengths = mask.sum(1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # [B+1]
        max_len = int(lengths.max())
        index = mask.reshape(-1).nonzero().squeeze(1)  # [T] positions of real tokens in [B*S]
        pos = (mask.cumsum(1) - 1).reshape(-1)[index]
        e = self.emb
        x = e.word_embeddings(ids.reshape(-1)[index]) + e.position_embeddings(pos) + e.token_type_embeddings(
            torch.zeros_like(pos))
        x = e.LayerNorm(x)  # [T, H]
        heads = self.cfg.num_attention_heads
        for layer in self.layers:
            a = layer.attention
            q, k, v = (lin(x).view(-1, heads, x.shape[1] // heads) for lin in (a.self.query, a.self.key, a.self.value))
            ctx = self.varlen_attn(q, k, v, cu, cu, max_len, max_len).reshape(x.shape)  # [T, H]
            x = a.output.LayerNorm(a.output.dense(ctx) + x)
            f = F.gelu(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(f) + x)
        out = x.new_zeros(B * S, x.shape[1])
        out[index] = x
        return out.view(B, S, -1)


def build_torch_varlen(model, dtype, device) -> Runner:
    _no_int8(dtype, "the packed PyTorch baseline")
    if not device.startswith("cuda"):
        raise Skip("torch.nn.attention.varlen.varlen_attn runs on CUDA only")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        raise Skip(f"torch {torch.__version__} has no torch.nn.attention.varlen") from None
    if not hasattr(model, "encoder") or not hasattr(model.embeddings, "token_type_embeddings"):
        raise Skip("the packed PyTorch baseline is written for BERT-shaped models")
    return PackedTorchBert(model, dtype, device)


# ---------------------------------------------------------------------------------------------- MHA only
def mha_inputs(case, hidden: int, heads: int, dtype, device, seed: int = 0):
    """Random ``qkv`` projections of the case: padded ``[B, S, 3H]`` and packed ``[T, 3H]`` (the same
    values at real tokens), a bias ``[3H]``, ``cu_seqlens`` and the padded mask."""
    g = torch.Generator().manual_seed(seed + case.max_len)
    B, S = case.input_ids.shape
    padded = torch.randn(B, S, 3 * hidden, generator=g).to(dtype)
    bias = torch.randn(3 * hidden, generator=g).to(dtype)
    mask = case.attention_mask.bool()
    packed = padded[mask]  # [T, 3H]
    cu = torch.tensor([0, *case.lengths]).cumsum(0).to(torch.int32)
    return {"padded": padded.to(device), "packed": packed.to(device), "bias": bias.to(device),
            "cu": cu.to(device), "mask": mask.to(device), "heads": heads, "max_len": max(case.lengths)}


def mha_padded_eager(inp) -> torch.Tensor:
    """PyTorch padded attention written out: ``Q K^T``, masked softmax, ``P V``: ``[B, S, H]``."""
    qkv = inp["padded"] + inp["bias"]
    B, S, three_h = qkv.shape
    h = inp["heads"]
    d = three_h // 3 // h
    q, k, v = qkv.view(B, S, 3, h, d).permute(2, 0, 3, 1, 4)  # each [B, h, S, d]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # [B, h, S, S]
    scores = scores.masked_fill(~inp["mask"][:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, -1)


def mha_padded_sdpa(inp) -> torch.Tensor:
    """PyTorch padded attention through ``scaled_dot_product_attention`` with a key-padding mask."""
    qkv = inp["padded"] + inp["bias"]
    B, S, three_h = qkv.shape
    h = inp["heads"]
    q, k, v = qkv.view(B, S, 3, h, three_h // 3 // h).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=inp["mask"][:, None, None, :])
    return out.transpose(1, 2).reshape(B, S, -1)


def mha_padfree(attention) -> Callable:
    """padfree's varlen attention op (as the encoder's backend resolved it) on the packed ``[T, 3H]``."""
    def run(inp):
        return attention(inp["packed"], inp["cu"], inp["max_len"], inp["heads"], inp["bias"])
    return run
