"""The CPU backend for the matrix products: oneDNN linears with prepacked weights and fused epilogues.

It implements the *fused* ops (a linear followed by what consumes it) and the embedding; the other elementwise
primitives stay with the portable torch backend. On this machine kind (2-core AVX-512-bf16 EPYC) a oneDNN linear on
a weight reordered once into oneDNN's blocked layout is 10-20 % faster than ``F.linear`` (MKL) in fp32 and a few %
in bf16, and the epilogues save whole passes over ``[T, F]`` / ``[T, H]`` (see benchmarks/NOTES.md for each
measurement):

- ``linear_bias_act``: bias and GELU/ReLU/SiLU run inside the matrix product (oneDNN eltwise post-op);
- ``linear_residual_layer_norm``: bias and residual add inside the product (oneDNN binary post-op), then LayerNorm;
- ``linear_tanh``: BERT's pooler, a few rows on the native product (below);
- ``embed_layer_norm`` (a primitive, the only one here): with AVX-512 the lookups, sum and LayerNorm in one native
  pass;
- ``qkv_varlen_attention``: the QKV product with its bias inside, then attention per group of equal-length
  sequences straight on strided views of ``[T, 3H]`` (PyTorch's CPU flash
  kernel runs in bf16: converting to fp32 was speed-neutral on W1 and 20 % slower on W2, see NOTES.md).

On Intel CPUs small fp32 batches (at most ``SMALL_ROWS`` packed tokens: one short request, the latency of a server)
run their products on MKL's packed sgemm instead, with the epilogue as separate ops: at 8-64 rows a product is a
pass over its weight, and MKL's packed kernel makes that pass 15-38 % faster than oneDNN's on 2 threads (the Xeon
VM), more than the fused epilogues save there (benchmarks/NOTES.md, section 15). On AMD's, MKL's sgemm takes 2-3x
oneDNN's time (section 19) and the path is off by default. Its packed copy of a weight is made on the first small
batch and costs the weight's size again (MiniLM +42 MB, BERT-base +325 MB); ``PADFREE_SMALL_ROWS=0`` turns it off.
Plain post-LN models run a short batch's whole layer stack in one native call instead (:func:`post_ln_layers`), on
the native module's own products for fp32 up to ``OWN_PRODUCT_ROWS`` tokens and bf16 up to ``BF16_NATIVE_ROWS``
(another packed copy of each weight, made on the first such batch), and on AMD CPUs on oneDNN's products (the copy
above) for fp32 up to ``ONEDNN_STACK_ROWS``.

Packed weights are cached per parameter and layout (weakly, and keyed by the parameter's version counter, so an
in-place update of the weight repacks it). Shapes: T = packed tokens, K = input features, N = output features.
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

import torch

from . import native, torch_backend
from .activations import apply_activation
from .relative import RelativeScores

# canonical activation -> oneDNN eltwise post-op (name, algorithm) of torch.ops.mkldnn._linear_pointwise
_POST_OPS = {"gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh"), "relu": ("relu", ""), "silu": ("swish", "")}


def _cpu_vendor() -> str:
    """The CPU's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``; "" where /proc/cpuinfo does not say)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# AMD's Zen 4 (measured on the EPYC machine kind, benchmarks/NOTES.md section 19): MKL's sgemm takes a generic path
# there (2-3x oneDNN's time at 8-128 rows), and vdpbf16ps runs at the fp32 FMA rate, so that bf16 dot products do
# twice the work of fp32 FMAs; on the Intel Xeon VM it ran at about half that rate (section 18).
_AMD = _cpu_vendor() == "AuthenticAMD"


def _small_rows() -> int:
    """``PADFREE_SMALL_ROWS`` (default 64, 0 on AMD CPUs): the most rows an fp32 product may have to run on MKL's
    packed sgemm; 0 turns the small-batch path off (no MKL copies of the weights)."""
    value = os.environ.get("PADFREE_SMALL_ROWS", "0" if _AMD else "64")
    if not value.strip().isdigit():
        raise ValueError("PADFREE_SMALL_ROWS must be an integer >= 0 (0 turns the small-batch path off); "
                         f"got {value!r}")
    return int(value)


SMALL_ROWS = _small_rows()  # fp32 products of at most this many rows run on MKL's packed sgemm (module docstring)
_MKL = torch.backends.mkl.is_available()

# how each layout packs a weight [N, K] (MKL's packing takes a row count to tune for: the small path's largest)
_PACKERS = {"onednn": lambda w: torch.ops.mkldnn._reorder_linear_weight(w),
            "mkl": lambda w: torch.ops.mkl._mkl_reorder_linear_weight(w, SMALL_ROWS),
            "blocks": lambda w: native.module().pack_blocks(w),  # the native product's blocks (fp32 or bf16)
            "pairs": lambda w: native.module().pack_pairs(w),  # the native bf16 dot product's blocks
            "fp32": lambda w: w.float()}  # a bf16 vector as fp32
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


def _small(x: torch.Tensor) -> bool:
    """Whether ``x @ W^T`` takes the small-batch path (MKL's packed sgemm, epilogue unfused)."""
    return _MKL and x.shape[0] <= SMALL_ROWS and x.dtype == torch.float32


def _mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` on MKL's packed sgemm (the small-batch path): ``[T, K] -> [T, N]``."""
    return torch.ops.mkl._mkl_linear(x, packed_weight(weight, "mkl"), weight, bias, x.shape[0])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias``: ``[T, K] -> [T, N]`` on the packed weight of the batch's path."""
    if _small(x):
        return _mkl_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, "none", [], "")


def linear_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str) -> torch.Tensor:
    """``act(x @ weight.T + bias)``: ``[T, K] -> [T, N]``, the activation fused where oneDNN has it."""
    if _small(x):
        return apply_activation(_mkl_linear(x, weight, bias), activation, inplace=True)
    post_op = _POST_OPS.get(activation)
    if post_op is None:
        return apply_activation(_linear(x, weight, bias), activation, inplace=True)
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight(weight), bias, post_op[0], [], post_op[1])


def linear_gated_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     activation: str) -> torch.Tensor:
    """``act(input) * gate`` of ``x @ weight.T + bias = [input | gate]``: ``[T, K] -> [T, N / 2]`` (the bias
    inside the product)."""
    return torch_backend.gated_act(_linear(x, weight, bias), None, activation)


def linear_residual_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               residual: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                               eps: float) -> torch.Tensor:
    """``LayerNorm(x @ weight.T + bias + residual)``: ``[T, K] -> [T, N]`` (fp32 LayerNorm statistics)."""
    if _small(x):
        y = _mkl_linear(x, weight, bias).add_(residual)
    else:
        y = torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed_weight(weight), bias, "add")  # [T, N]
    return torch.layer_norm(y, y.shape[-1:], ln_weight, ln_bias, eps)


def embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
                     eps: float) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``: ``[T, E]``. With AVX-512 one native pass
    (the rows summed in fp32 and normalised, rounded once to the tables' dtype): at a handful of tokens ATen's three
    lookups, two adds and LayerNorm cost ~5 us of dispatch each (NOTES.md section 20); otherwise the torch
    backend's."""
    mod = native.module()
    tables = [t for t in (word, position, token_type) if t is not None]
    if mod is None or not mod.has_avx512() or word.dtype not in (torch.float32, torch.bfloat16) \
            or any(t.dtype != word.dtype or not t.is_contiguous() for t in tables):
        return torch_backend.embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type,
                                              weight, bias, eps)
    return mod.embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type,
                                _fp32(weight).contiguous(), None if bias is None else _fp32(bias).contiguous(), eps)


def linear_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``tanh(x @ weight.T + bias)``: ``[B, K] -> [B, N]``, BERT's pooler over the first token of each sequence.
    A few rows' product is one pass over the weight: with AVX-512 the native product streams it (MiniLM's pooler
    at batch 1: 62-77 us against 145-194 for ``F.linear``, the weight cold after the layers; NOTES.md section 20)."""
    y = _native_linear(x, weight, bias)
    return torch.tanh(_linear(x, weight, bias) if y is None else y)


def _native_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``x @ weight.T + bias`` on the native product where it takes the batch (:func:`_native_packing`; computed in
    fp32 and rounded once), else None."""
    mod = native.module()
    if mod is None or bias is None or (native_product := _native_packing(x, mod)) is None:
        return None
    layout, vector = native_product  # the dot product takes a bf16 x as it is (it would round an fp32 one back)
    y = mod.blocks_linear((x if layout == "pairs" else x.float()).contiguous(), packed_weight(weight, layout),
                          weight.shape[0], vector(bias).contiguous())
    return y.to(x.dtype)


def _native_packing(x: torch.Tensor, mod) -> tuple[str, Callable] | None:
    """The packing of the native product for a batch ``x`` and how its vectors are passed (fp32), or None where the
    product does not take the batch: with AVX-512, fp32 up to ``OWN_PRODUCT_ROWS`` rows and bf16 up to
    ``BF16_NATIVE_ROWS`` (dot products with ``BF16_DOT`` and AVX-512 BF16, the widened weight otherwise)."""
    if not mod.has_avx512():
        return None
    if x.dtype == torch.bfloat16 and x.shape[0] <= BF16_NATIVE_ROWS:
        return ("pairs" if BF16_DOT and mod.has_avx512_bf16() else "blocks"), _fp32_copy
    if x.dtype == torch.float32 and x.shape[0] <= OWN_PRODUCT_ROWS:
        return "blocks", _same
    return None


_NATIVE_ACTIVATIONS = frozenset({"gelu", "gelu_tanh", "relu", "silu"})  # those small_layers.cpp applies
# With AVX-512, fp32 batches of at most OWN_PRODUCT_ROWS tokens run the native stack on its own product, which
# prefetches the weight it streams (Xeon: 1.2-2.3x MKL's packed sgemm at 8-48 rows, and MKL's is faster at 49-64
# for BERT-base's shapes, so those keep it; EPYC: faster than oneDNN's to 64 rows, as fast at 96, and from there to
# 128 the stack runs oneDNN's, 4 % faster whole on BERT-base); bf16 batches of at most BF16_NATIVE_ROWS on its own
# product, where it beats oneDNN's bf16 products by 1.3-1.7x on the Xeon, and on the EPYC (bf16 dot products) to
# 32 rows and matches them above (benchmarks/NOTES.md, sections 18 and 19).
OWN_PRODUCT_ROWS = 96 if _AMD else 48
ONEDNN_STACK_ROWS = 128 if _AMD else 0  # fp32 batches above OWN_PRODUCT_ROWS, up to this, on oneDNN's products
BF16_NATIVE_ROWS = 128
BF16_DOT = _AMD  # bf16 batches on bf16 dot products (x rounded to bf16), not on fp32 FMAs of the widened weight
# the longest sequence the stack's own attention takes (PyTorch's flash kernel above): it was as fast as PyTorch's
# at 64 tokens on the Xeon, and 1.3-1.4x faster at 128 on the EPYC
ATTENTION_LEN = 128 if _AMD else 64


def post_ln_layers(x: torch.Tensor, layers, runs, num_heads: int, scale: float, eps: float,
                   activation: str) -> torch.Tensor | None:
    """The post-LN stack of a small batch (``layers``: ``EncoderLayer``s in the order they run) in one native call,
    :mod:`padfree.ops.native`. None where it does not apply (another activation, a tensor the stack lacks, no
    native module, more tokens than it takes): the encoder then runs the layers one by one.

    - With AVX-512 the attention of sequences up to ``ATTENTION_LEN`` tokens and the activation are the module's
      own kernels, and so are the products of fp32 batches up to ``OWN_PRODUCT_ROWS`` tokens and bf16 batches up
      to ``BF16_NATIVE_ROWS`` (its packed copy of a weight costs the weight's size again, as MKL's and oneDNN's do);
      above ``OWN_PRODUCT_ROWS``, fp32 batches up to ``SMALL_ROWS`` tokens run on MKL's products (Intel) or up to
      ``ONEDNN_STACK_ROWS`` on oneDNN's (AMD; the packing the Python forward uses too). fp32 gives the Python
      forward's result within fp32 rounding; bf16 runs the same fp32 stack on the bf16 weights and rounds the
      result to bf16 once, its products on the widened weights or, with ``BF16_DOT`` (AMD), bf16 dot products on
      x rounded to bf16 (and the attention on q, k, v and its weights rounded to bf16, as a bf16 attention takes
      them): faster than oneDNN's bf16 products at these sizes, and more exact than a bf16 forward.
    - Without AVX-512, fp32 batches of at most ``SMALL_ROWS`` tokens: the ATen ops of the small-batch path (MKL's
      products) without Python between them."""
    if activation not in _NATIVE_ACTIVATIONS or (mod := native.module()) is None:
        return None
    if (native_product := _native_packing(x, mod)) is not None:
        layout, vector = native_product
    elif _small(x):  # MKL's products (above OWN_PRODUCT_ROWS, or no AVX-512: then ATen's ops all through)
        layout, vector = "mkl", _same
    elif x.dtype == torch.float32 and mod.has_avx512() and x.shape[0] <= ONEDNN_STACK_ROWS:
        layout, vector = "onednn", _same
    else:
        return None
    flat = []
    for layer in layers:
        args = _stack_args(layer, layout, vector)
        if args is None:
            return None
        flat += args
    y = mod.post_ln_layers(x.float().contiguous(), flat, [v for run in runs for v in run], num_heads, scale, eps,
                           activation, ATTENTION_LEN, layout == "onednn")
    return y.to(x.dtype)


def _stack_args(layer, layout: str, vector) -> tuple | None:
    """The layer's 16 arguments of the native stack for a packing layout (None where it lacks a tensor), kept per
    layer and reused while its tensors are the same objects at the same versions: a parameter replaced or updated
    in place rebuilds them, as :func:`packed_weight` repacks. Rebuilding them at each call cost 7 us a layer hot and
    ~30 cold after a forward (BERT-base: 376 us a call; NOTES.md section 20); the check costs about half."""
    t = layer.tensors()
    hit = _stack_cache.get(layer, {}).get(layout)
    if hit is not None and all(a is b for a, b in zip(t, hit[0])) and all(p._version == v for p, v in hit[1]):
        return hit[2]
    if any(v is None for v in t):
        return None
    args = (t.qkv_weight, packed_weight(t.qkv_weight, layout), vector(t.qkv_bias),
            t.attn_out_weight, packed_weight(t.attn_out_weight, layout), vector(t.attn_out_bias),
            vector(t.attn_norm_weight), vector(t.attn_norm_bias),
            t.ffn_in_weight, packed_weight(t.ffn_in_weight, layout), vector(t.ffn_in_bias),
            t.ffn_out_weight, packed_weight(t.ffn_out_weight, layout), vector(t.ffn_out_bias),
            vector(t.ffn_norm_weight), vector(t.ffn_norm_bias))
    versions = tuple((p, p._version) for p in t if not p.is_inference())  # inference tensors keep no counter
    with _packing:
        _stack_cache.setdefault(layer, {})[layout] = (t, versions, args)
    return args


_stack_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {layout: (tensors, versions, args)}


def _same(v: torch.Tensor) -> torch.Tensor:
    return v


def _fp32(v: torch.Tensor) -> torch.Tensor:
    """A vector as fp32: itself, or its cached fp32 copy."""
    return v if v.dtype == torch.float32 else _fp32_copy(v)


def _fp32_copy(v: torch.Tensor) -> torch.Tensor:
    """A bf16 bias or LayerNorm vector as fp32, converted once per parameter (cached like a packed weight)."""
    return packed_weight(v, "fp32")


def qkv_varlen_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cu_seqlens: torch.Tensor,
                         max_seqlen: int, num_heads: int, scale: float | None = None,
                         rel: RelativeScores | None = None, runs=None, rotary=None, window=None) -> torch.Tensor:
    """Self-attention of each packed sequence on ``x [T, H]`` with the fused ``[3H, H]`` QKV projection:
    returns the context ``[T, H]`` in x's dtype. ``rel``: relative-position terms (q and k include the bias);
    ``runs``: the batch's runs of equal lengths (``PackedBatch.runs``); ``rotary``/``window``: see the torch
    backend's varlen_attention."""
    qkv = _linear(x, weight, bias)  # [T, 3H], bias added inside the product
    return torch_backend.varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, None, scale, rel, runs,
                                          rotary, window)
