"""The CPU backend for the matrix products: oneDNN linears with prepacked weights and fused epilogues.

It implements the *fused* ops (a linear followed by what consumes it) and the embedding; the other elementwise
primitives stay with the portable torch backend. A linear runs on its weight reordered once into oneDNN's blocked
layout, faster than ``F.linear`` (MKL), and the epilogues save whole passes over ``[T, F]`` / ``[T, H]``
(benchmarks/NOTES.md, section 1):

- ``linear_bias_act``: bias and GELU/ReLU/SiLU run inside the matrix product (oneDNN eltwise post-op);
- ``linear_residual_layer_norm``: bias and residual add inside the product (oneDNN binary post-op), then LayerNorm;
- ``linear_tanh``: BERT's pooler, a few rows on the native product (below);
- ``embed_layer_norm`` (a primitive, the only one here): with the native kernels the lookups, sum and LayerNorm in
  one native pass;
- ``qkv_varlen_attention``: the QKV product with its bias inside, then attention per group of equal-length
  sequences straight on strided views of ``[T, 3H]``, in the activations' dtype (PyTorch's CPU flash kernel takes
  bf16 as it is: converting it to fp32 did not pay, NOTES.md section 2).

Which path a batch takes is decided by the CPU plan each function takes (``plan``: the encoder's, resolved once;
:mod:`padfree.cpu`). Small fp32 batches (at most ``plan.mkl_small_rows`` packed tokens: Intel CPUs) run their
products on MKL's packed sgemm, with the epilogue as separate ops: at a few dozen rows a product is a pass over its
weight, which MKL's packed kernel makes faster than oneDNN's on Intel's CPUs and slower on AMD's, where the path is
off (NOTES.md, sections 15 and 19). Its packed copy of a weight is made on the first small batch and costs the
weight's size again (section 15). Plain post-LN models run a short batch's whole layer stack in one native call
instead (:func:`post_ln_layers`, the path :func:`stack_path` names): on the native module's own products (AVX-512
or AVX2 kernels) for fp32 up to ``plan.own_product_rows`` tokens and bf16 up to ``plan.bf16_native_rows`` (another
packed copy of each weight, made on the first such batch), and on oneDNN's products (the copy above) for fp32 up to
``plan.onednn_stack_rows``.

Packed weights are cached per parameter and layout (weakly, and keyed by the parameter's version counter, so an
in-place update of the weight repacks it). Shapes: T = packed tokens, K = input features, N = output features.
"""
from __future__ import annotations

import threading
import weakref

import torch

from .. import cpu
from ..cpu import CpuPlan
from . import native, torch_backend
from .activations import apply_activation
from .relative import RelativeScores

# canonical activation -> oneDNN eltwise post-op (name, algorithm) of torch.ops.mkldnn._linear_pointwise
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""), "silu": ("swish", "")}


_MKL = torch.backends.mkl.is_available()

# how each layout packs a weight [N, K] (MKL's packing takes a row count to tune for: 64, the small path's default)
_PACKERS = {"onednn": lambda w: torch.ops.mkldnn._reorder_linear_weight(w),
            "onednn_fp32": lambda w: torch.ops.mkldnn._reorder_linear_weight(w.float()),  # a bf16 weight, widened
            "mkl": lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, 64),
            "blocks": lambda w: native.module().pack_blocks(w),  # the native product's blocks (fp32 or bf16)
            "pairs": lambda w: native.module().pack_pairs(w),  # the native bf16 dot product's blocks
            "fp32": lambda w: w.float(),  # a bf16 vector as fp32
            "int8": lambda w: native.module().pack_int8(w)}  # (int8 packing, per-column scales): int8_backend
# (id(weight), layout) -> (weight ref, version, packed)
_packed: dict[tuple[int, str], tuple[weakref.ref, int, torch.Tensor]] = {}
_packing = threading.Lock()  # serialises filling _packed (the hit path reads it without a lock)


def packed_weight(weight: torch.Tensor, layout: str = "onednn") -> torch.Tensor:
    """``weight [N, K]`` reordered once into oneDNN's blocked layout, or another of ``_PACKERS`` (MKL's packing,
    the native product's blocks, an fp32 copy); cached while the parameter lives.

    Safe from many threads: a hit is one dict read; a miss packs under a lock, re-checking first, so two
    threads never pack the same weight or interleave an entry with its finaliser."""
    key, version = (id(weight), layout), torch_backend.tensor_version(weight)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        return hit[2]
    with _packing:
        hit = _packed.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == version:
            return hit[2]
        with torch.no_grad():
            packed = _PACKERS[layout](weight.detach())
        if hit is None or hit[0]() is not weight:  # a new parameter: drop its entry when it dies
            weakref.finalize(weight, _forget, key, weakref.ref(weight))
        _packed[key] = (weakref.ref(weight), version, packed)
    return packed


def _forget(key: tuple[int, str], ref: weakref.ref) -> None:
    """Finaliser of a packed parameter: drop its entry, unless the id now belongs to a newer parameter."""
    with _packing:
        hit = _packed.get(key)
        if hit is not None and hit[0]() is None:
            del _packed[key]


def _small(x: torch.Tensor, weight: torch.Tensor, plan: CpuPlan) -> bool:
    """Whether ``x @ W^T`` takes the small-batch path (MKL's packed sgemm, epilogue unfused; fp32 weights)."""
    return _MKL and x.shape[0] <= plan.mkl_small_rows and x.dtype == weight.dtype == torch.float32


def _onednn_weight(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The weight's oneDNN packing for products on ``x``: in its own dtype, or widened to fp32 once for fp32
    activations on bf16 weights (a bf16 model computing in fp32 where bf16 products are slow: NOTES.md section 22)."""
    return packed_weight(weight, "onednn" if weight.dtype == x.dtype else "onednn_fp32")


def _like(x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor | None:
    """A bias or LayerNorm vector in x's dtype: itself, or (bf16 for fp32 activations) its cached fp32 copy."""
    return v if v is None or v.dtype == x.dtype else _fp32_copy(v)


def _mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` on MKL's packed sgemm (the small-batch path): ``[T, K] -> [T, N]``."""
    return torch.ops.mkl._mkl_linear(x, packed_weight(weight, "mkl"), weight, bias, x.shape[0])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: CpuPlan) -> torch.Tensor:
    """``x @ weight.T + bias``: ``[T, K] -> [T, N]`` on the packed weight of the batch's path."""
    if _small(x, weight, plan):
        return _mkl_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(x, weight), _like(x, bias), "none", [], "")


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str, plan: CpuPlan | None = None) -> torch.Tensor:
    """``act(x @ weight.T + bias)``: ``[T, K] -> [T, N]``, the activation fused where oneDNN has it."""
    plan = plan or cpu.current()
    if _small(x, weight, plan):
        return apply_activation(_mkl_linear(x, weight, bias), activation, inplace=True)
    post_op = _POST_OPS.get(activation)
    if post_op is None:
        return apply_activation(_linear(x, weight, bias, plan), activation, inplace=True)
    return torch.ops.mkldnn._linear_pointwise(x, _onednn_weight(x, weight), _like(x, bias), post_op[0], [],
                                              post_op[1])


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str, plan: CpuPlan | None = None) -> torch.Tensor:
    """``act(input) * gate`` of ``x @ weight.T + bias = [input | gate]``: ``[T, K] -> [T, N / 2]`` (the bias
    inside the product)."""
    return torch_backend.gated_act(_linear(x, weight, bias, plan or cpu.current()), None, activation)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                    plan: CpuPlan | None = None) -> torch.Tensor:
    """``x @ weight.T + bias + residual``: ``[T, K] -> [T, N]`` (a pre-LN layer's output products)."""
    return _linear(x, weight, bias, plan or cpu.current()).add_(residual)


def linear_residual_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                               eps: float, plan: CpuPlan | None = None) -> torch.Tensor:
    """``LayerNorm(x @ weight.T + bias + residual)``: ``[T, K] -> [T, N]`` (fp32 LayerNorm statistics)."""
    if _small(x, weight, plan or cpu.current()):
        y = _mkl_linear(x, weight, bias).add_(residual)
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, _onednn_weight(x, weight), _like(x, bias),
                                                      "add")  # [T, N]
    return torch.layer_norm(y, y.shape[-1:], _like(y, ln_weight), _like(y, ln_bias), eps)


def embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
                     eps: float, plan: CpuPlan | None = None) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``: ``[T, E]``. With the native kernels (AVX2 or
    AVX-512) one pass (the rows summed in fp32 and normalised, rounded once to the tables' dtype) in place of ATen's
    three lookups, two adds and LayerNorm, whose dispatch is most of their cost at a handful of tokens (NOTES.md
    section 20); otherwise the torch backend's."""
    isa = (plan or cpu.current()).native_isa
    mod = native.module() if isa in _KERNEL_ISAS else None
    tables = [t for t in (word, position, token_type) if t is not None]
    if mod is None or word.dtype not in (torch.float32, torch.bfloat16) \
            or any(t.dtype != word.dtype or not t.is_contiguous() for t in tables):
        return torch_backend.embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type,
                                              weight, bias, eps)
    return mod.embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type,
                                _fp32(weight).contiguous(), None if bias is None else _fp32(bias).contiguous(), eps,
                                isa)


def linear_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                plan: CpuPlan | None = None) -> torch.Tensor:
    """``tanh(x @ weight.T + bias)``: ``[B, K] -> [B, N]``, BERT's pooler over the first token of each sequence.
    A few rows' product is one pass over the weight, cold after the layers: the native product streams it faster
    than ``F.linear`` does (NOTES.md section 20)."""
    plan = plan or cpu.current()
    y = _native_linear(x, weight, bias, plan)
    return torch.tanh(_linear(x, weight, bias, plan) if y is None else y)


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   plan: CpuPlan) -> torch.Tensor | None:
    """``x @ weight.T + bias`` on the native product where it takes the batch (:func:`native_packing`; computed in
    fp32 and rounded once), else None."""
    if bias is None or (layout := native_packing(weight.dtype, x.shape[0], plan)) is None \
            or (mod := native.module()) is None:
        return None
    # the dot product takes a bf16 x as it is (it would round an fp32 one back)
    y = mod.blocks_linear((x if layout == "pairs" else x.float()).contiguous(), packed_weight(weight, layout),
                          weight.shape[0], _fp32(bias).contiguous(), plan.native_isa)
    return y.to(x.dtype)


_KERNEL_ISAS = ("avx512", "avx2")  # the plan's native_isa values with the module's own kernels


def native_packing(dtype: torch.dtype, rows: int, plan: CpuPlan) -> str | None:
    """The packing of the native product for a batch of ``rows`` tokens on weights of ``dtype``, or None where the
    product does not take the batch: with the native kernels, fp32 up to ``plan.own_product_rows`` rows and bf16 up
    to ``plan.bf16_native_rows`` (dot products where ``plan.bf16_dot``, the widened weight otherwise); its vectors
    are passed in fp32."""
    if plan.native_isa not in _KERNEL_ISAS:
        return None
    if dtype == torch.bfloat16 and rows <= plan.bf16_native_rows:
        return "pairs" if plan.bf16_dot else "blocks"
    if dtype == torch.float32 and rows <= plan.own_product_rows:
        return "blocks"
    return None


_NATIVE_ACTIVATIONS = frozenset({"gelu", "gelu_tanh", "relu", "silu"})  # those small_layers.cpp applies


def stack_path(dtype: torch.dtype, rows: int, plan: CpuPlan) -> str | None:
    """The products a batch of ``rows`` tokens on weights of ``dtype`` runs in the native stack under ``plan``: the
    packing of its layers' weights (``StackLayer.packing``: "blocks", "pairs": the native product; "mkl", "onednn":
    those libraries'), or None where the stack does not take it (the layers then run one by one). The thresholds are
    the plan's (:func:`padfree.cpu.plan_for`)."""
    if not plan.native_isa:
        return None
    if (layout := native_packing(dtype, rows, plan)) is not None:
        return layout
    if dtype == torch.float32 and _MKL and rows <= plan.mkl_small_rows:
        return "mkl"  # MKL's products (above own_product_rows, or no native kernels: then ATen's ops all through)
    if dtype == torch.float32 and plan.native_isa in _KERNEL_ISAS and rows <= plan.onednn_stack_rows:
        return "onednn"
    return None


def post_ln_layers(x: torch.Tensor, layers, runs, num_heads: int, scale: float, eps: float,
                   activation: str, plan: CpuPlan | None = None) -> torch.Tensor | None:
    """The post-LN stack of a small batch (``layers``: ``EncoderLayer``s in the order they run) in one native call,
    :mod:`padfree.ops.native`. None where it does not apply (another activation, a tensor the stack lacks, no
    native module, more tokens than it takes): the encoder then runs the layers one by one.

    The batch's path is :func:`stack_path`'s: with the native kernels (``plan.native_isa``: AVX-512 or AVX2) the
    attention of sequences up to ``plan.attention_len`` tokens and the activation are the module's own, and so are
    the products of fp32 batches up to ``plan.own_product_rows`` tokens and bf16 batches up to
    ``plan.bf16_native_rows`` (its packed copy of a weight costs the weight's size again, as MKL's and oneDNN's do);
    above those, fp32 batches up to ``plan.mkl_small_rows`` tokens run on MKL's products or up to
    ``plan.onednn_stack_rows`` on oneDNN's (the packing the Python forward uses too). fp32 gives the Python forward's
    result within fp32 rounding; bf16 runs the same fp32 stack on the bf16 weights and rounds the result to bf16
    once, its products on the widened weights or, with ``plan.bf16_dot``, bf16 dot products on x rounded to bf16
    (and the attention on q, k, v and its weights rounded to bf16, as a bf16 attention takes them): faster than
    oneDNN's bf16 products at these sizes, and more exact than a bf16 forward. Without native kernels
    (``native_isa`` "aten"), fp32 batches of at most ``plan.mkl_small_rows`` tokens: the ATen ops of the
    small-batch path (MKL's products) without Python between them."""
    plan = plan or cpu.current()
    weights = layers[0].tensors().qkv_weight.dtype  # bf16 weights with fp32 x: a bf16 model computing in fp32
    if x.dtype not in (weights, torch.float32) or (layout := stack_path(weights, x.shape[0], plan)) is None:
        return None
    return run_stack(x, layers, runs, num_heads, scale, eps, activation, layout, plan)


def run_stack(x: torch.Tensor, layers, runs, num_heads: int, scale: float, eps: float, activation: str, layout: str,
              plan: CpuPlan) -> torch.Tensor | None:
    """The native stack's call for ``layout`` (a :func:`stack_path` or "int8": :mod:`.int8_backend`'s products);
    None where it does not apply (another activation, a tensor the stack lacks, no native module)."""
    if activation not in _NATIVE_ACTIVATIONS or native.module() is None:
        return None
    stack = []
    for layer in layers:
        named = _stack_layer(layer, layout)
        if named is None:
            return None
        stack.append(named)
    y = native.module().post_ln_layers(x.float().contiguous(), stack, [v for run in runs for v in run], num_heads,
                                       scale, eps, activation, plan.attention_len, plan.native_isa)
    return y.to(x.dtype)


def _stack_layer(layer, layout: str):
    """The layer as the native stack's ``StackLayer`` for a packing layout (every tensor by name, the layout
    stated; None where the layer lacks a tensor), built on the first batch that takes that layout and kept per
    layer while its tensors are the same objects at the same versions: a parameter replaced or updated in place
    rebuilds it, as :func:`packed_weight` repacks (why kept: NOTES.md section 20)."""
    t = layer.tensors()
    hit = _stack_cache.get(layer, {}).get(layout)
    if hit is not None and all(a is b for a, b in zip(t, hit[0])) and all(p._version == v for p, v in hit[1]):
        return hit[2]
    if any(v is None for v in t):
        return None
    named = native.module().StackLayer(
        packing=layout, **_linear_fields("qkv", t.qkv_weight, t.qkv_bias, layout),
        **_linear_fields("attn_out", t.attn_out_weight, t.attn_out_bias, layout),
        attn_norm_weight=_fp32(t.attn_norm_weight), attn_norm_bias=_fp32(t.attn_norm_bias),
        **_linear_fields("ffn_in", t.ffn_in_weight, t.ffn_in_bias, layout),
        **_linear_fields("ffn_out", t.ffn_out_weight, t.ffn_out_bias, layout),
        ffn_norm_weight=_fp32(t.ffn_norm_weight), ffn_norm_bias=_fp32(t.ffn_norm_bias))
    versions = tuple((p, p._version) for p in t if not p.is_inference())  # inference tensors keep no counter
    with _packing:
        _stack_cache.setdefault(layer, {})[layout] = (t, versions, named)
    return named


def _linear_fields(name: str, weight: torch.Tensor, bias: torch.Tensor, layout: str) -> dict[str, torch.Tensor]:
    """One linear's ``StackLayer`` fields: its weight, packing (and the int8 packing's scales) and fp32 bias."""
    packed = packed_weight(weight, layout)
    fields = {f"{name}_weight": weight, f"{name}_bias": _fp32(bias)}
    if layout == "int8":
        fields[f"{name}_packed"], fields[f"{name}_scales"] = packed
    else:
        fields[f"{name}_packed"] = packed
    return fields


# layer -> {layout: (its tensors, their versions, its StackLayer)}
_stack_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fp32(v: torch.Tensor) -> torch.Tensor:
    """A vector as fp32: itself, or its cached fp32 copy."""
    return v if v.dtype == torch.float32 else _fp32_copy(v)


def _fp32_copy(v: torch.Tensor) -> torch.Tensor:
    """A bf16 bias or LayerNorm vector as fp32, converted once per parameter (cached like a packed weight)."""
    return packed_weight(v, "fp32")


def qkv_varlen_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int, num_heads: int, scale: float | None = None,
                         rel: RelativeScores | None = None, runs=None, rotary=None, window=None,
                         plan: CpuPlan | None = None) -> torch.Tensor:
    """Self-attention of each packed sequence on ``x [T, H]`` with the fused ``[3H, H]`` QKV projection:
    returns the context ``[T, H]`` in x's dtype. ``rel``: relative-position terms (q and k include the bias);
    ``runs``: the batch's runs of equal lengths (``PackedBatch.runs``); ``rotary``/``window``: see the torch
    backend's varlen_attention."""
    qkv = _linear(x, weight, bias, plan or cpu.current())  # [T, 3H], bias added inside the product
    return torch_backend.varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, None, scale, rel, runs,
                                          rotary, window)
