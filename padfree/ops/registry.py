"""Backend registry: which implementation of each op runs for a device, dtype and head size.

Each backend declares what it supports as data; :meth:`Backend.validate` returns the reasons it cannot run
a given case. :func:`select` walks the priority list and returns the first backend that fits, logging the
choice; if none fits (or a named backend does not), it raises one ``ValueError`` listing every reason.
Kernel modules are imported only when a backend is chosen, so a missing Triton never breaks ``import padfree``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import cpu
from ..cpu import CpuPlan
from . import native

log = logging.getLogger("padfree")


def _compose_qkv_attention(attention: Callable) -> Callable:
    def qkv_varlen_attention(x, w, b, cu, max_seqlen, heads, scale=None, rel=None, runs=None, rotary=None,
                             window=None):
        # the QKV bias goes into the attention op (Triton adds it as it loads); rel=, rotary=, window= only where
        # given, so a backend without those features keeps its plain signature
        extra = {n: v for n, v in (("rel", rel), ("rotary", rotary), ("window", window)) if v is not None}
        return attention(F.linear(x, w), cu, max_seqlen, heads, b, scale, runs=runs, **extra)
    return qkv_varlen_attention


def _compose_linear_gated_act(gated_act: Callable) -> Callable:
    return lambda x, w, b, activation: gated_act(F.linear(x, w), b, activation)


def _compose_linear_bias_act(bias_act: Callable) -> Callable:
    return lambda x, w, b, activation: bias_act(F.linear(x, w), b, activation)


def _compose_linear_residual_layer_norm(add_ln: Callable) -> Callable:
    return lambda x, w, b, residual, ln_w, ln_b, eps: add_ln(F.linear(x, w), b, residual, ln_w, ln_b, eps)


def _compose_linear_tanh() -> Callable:
    return lambda x, w, b: torch.tanh(F.linear(x, w, b))


def _compose_linear_residual() -> Callable:
    return lambda x, w, b, residual: F.linear(x, w, b).add_(residual)


def _compose_post_ln_layers() -> Callable:
    return lambda x, layers, runs, heads, scale, eps, activation: None  # no fused stack: the encoder runs each layer


@dataclass(frozen=True)
class Op:
    """One op the encoder calls: everything the registry needs to know about it, in one place."""
    name: str
    signature: str                       # the call every backend implements (documentation)
    attention: bool = False              # checked against a backend's head sizes and relative capability
    composed_from: str | None = None     # a fused op composed as F.linear + a primitive: that primitive
    compose: Callable[..., Callable] | None = None  # a fused op's composition, where no backend implements it:
                                         # given composed_from's resolved function, or nothing where it calls no
                                         # primitive (torch ops alone, or none); a primitive has none
    named_after: str | None = None       # a composition that calls no primitive: the primitive whose backend it is
                                         # listed with, composed(<that backend>), as it runs beside that backend's
                                         # ops on their device (the CUDA graph check reads these names)
    uses: frozenset[str] = frozenset()   # model features (ModelConfig.features) that change what this op must
                                         # do; a backend runs it for such a model only if it lists them
    only_for: str | None = None          # resolved only for models with this feature (e.g. "gated_ffn")
    product: bool = False                # multiplies by a weight: under int8 products (Encoder.products) only a
                                         # backend listing them runs it (never a composition on F.linear)


# Every op, once. Primitives first; the fused ops are a linear together with what consumes its output: a backend
# may implement them (the CPU oneDNN backend does, with the matrix-product epilogues); where none does, the
# registry composes them from F.linear and the primitive it resolved, so a backend that only has the primitives
# (Triton) keeps its kernels; two compositions call no primitive (the pooler's and the stack's). Adding an op: one
# entry here, a function of that name in each backend module that implements it (listed in its Backend.ops), a
# reference in reference.py, a wrapper in ops/__init__.py.
_ATTENTION_FEATURES = frozenset({"rotary", "sliding_window"})
OPS: dict[str, Op] = {op.name: op for op in (
    Op("varlen_attention", "(qkv [T, 3H], cu_seqlens, max_seqlen, num_heads, qkv_bias=None, scale=None, rel=None, "
       "runs=None, rotary=None, window=None) -> [T, H]", attention=True, uses=_ATTENTION_FEATURES),
    Op("add_bias_residual_layer_norm", "(x [T, H], bias, residual, weight, ln_bias, eps) -> [T, H]"),
    Op("bias_act", "(x [T, F], bias, activation) -> [T, F]"),
    Op("gated_act", "(x [T, 2F], bias, activation) -> act(x[:, :F]) * x[:, F:] [T, F]", only_for="gated_ffn"),
    Op("rms_norm", "(x [T, H], weight, eps) -> x / sqrt(mean(x^2) + eps) * weight [T, H]", only_for="rms_norm"),
    Op("embed_layer_norm", "(ids, positions, types, word, position, token_type, weight, bias, eps) -> [T, E]",
       uses=frozenset({"norm_without_bias"})),
    Op("qkv_varlen_attention", "(x [T, H], weight [3H, H], bias, cu_seqlens, max_seqlen, num_heads, scale=None, "
       "rel=None, runs=None, rotary=None, window=None) -> [T, H]", attention=True, composed_from="varlen_attention",
       compose=_compose_qkv_attention, uses=_ATTENTION_FEATURES, product=True),
    Op("linear_bias_act", "(x [T, K], weight [N, K], bias, activation) -> act(x W^T + b) [T, N]",
       composed_from="bias_act", compose=_compose_linear_bias_act, product=True),
    Op("linear_gated_act", "(x [T, K], weight [2F, K], bias, activation) -> gated_act(x W^T + b) [T, F]",
       composed_from="gated_act", compose=_compose_linear_gated_act, only_for="gated_ffn", product=True),
    Op("linear_residual_layer_norm", "(x [T, K], weight [N, K], bias, residual [T, N], ln_weight, ln_bias, eps) "
       "-> [T, N]", composed_from="add_bias_residual_layer_norm", compose=_compose_linear_residual_layer_norm,
       product=True),
    # BERT's pooler over the first token of each sequence (a few rows: a pass over the weight); composed of torch
    # ops alone (no primitive has tanh)
    Op("linear_tanh", "(x [B, K], weight [N, K], bias) -> tanh(x W^T + b) [B, N]", compose=_compose_linear_tanh,
       named_after="bias_act", product=True),
    # a pre-LN layer's output products, added to the residual stream
    Op("linear_residual", "(x [T, K], weight [N, K], bias, residual [T, N]) -> x W^T + b + residual [T, N]",
       compose=_compose_linear_residual, named_after="bias_act", product=True),
    # the whole post-LN stack of a plain layer (no relative terms, rotary or gated FFN) in one call where a backend
    # has it for this batch; its composition calls nothing and answers None: run the layers one by one
    Op("post_ln_layers", "(x [T, H], layers [EncoderLayer], runs, num_heads, scale, eps, activation) -> [T, H] or "
       "None", compose=_compose_post_ln_layers, named_after="bias_act", product=True),
)}
PRIMITIVES = tuple(name for name, op in OPS.items() if op.compose is None)
FUSED_OPS = tuple(name for name, op in OPS.items() if op.compose is not None)


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]                  # device types it runs on ("cpu", "cuda")
    dtypes: frozenset[torch.dtype]
    module: str                              # module holding one function per op it implements
    ops: frozenset[str]                      # which of OPS it implements
    head_dims: frozenset[int] | None = None  # attention head sizes it supports; None = any
    requires: str | None = None              # a Python package it needs (checked lazily)
    relative_scores: bool = False            # its attention accepts ``rel=`` (relative-position score
                                             # terms: MPNet's bias, DeBERTa's c2p/p2c)
    needs_mkldnn: bool = False               # runs on PyTorch's oneDNN (mkldnn) CPU build
    primitives_from: str | None = None       # named alone, the backend whose primitives it runs with (onednn
                                             # implements only the fused ops; its attention is the torch one)
    features: frozenset[str] = frozenset()   # model features its ops handle (see Op.uses): "rotary" and
                                             # "sliding_window" in the attention, "norm_without_bias" in the
                                             # embedding LayerNorm
    takes_plan: bool = False                 # its functions take the CPU plan (``plan=``, padfree.cpu.CpuPlan):
                                             # the registry binds the encoder's
    products: frozenset[str] = frozenset({"float"})  # the products its product ops compute: "float" (in the
                                             # activations' dtype) or "int8" (quantized weights and activations)
    needs_plan: str | None = None            # a CpuPlan field that must be set for it to run (its reason says why not)
    needs_native: bool = False               # runs on padfree's native module (padfree.ops.native), built if missing

    def validate(self, op: str | None, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
                 relative_scores: bool = False, features: frozenset[str] = frozenset(),
                 plan: CpuPlan | None = None, products: str = "float") -> list[str]:
        """Every reason this backend cannot run ``op`` here (empty list = it can); ``op=None``: any op of its.

        ``relative_scores``: the caller will pass relative-position score terms to the attention;
        ``features``: the model's :attr:`padfree.config.ModelConfig.features`; ``plan``: the CPU's (default: this
        machine's, :func:`padfree.cpu.current`); ``products``: what the model's product ops compute ("float" or
        "int8"; the primitives are float whatever it is)."""
        reasons = []
        if op is not None and op not in self.ops:
            reasons.append(f"does not implement {op}")
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not in {sorted(self.devices)}")
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}")
        attention = op is not None and OPS[op].attention
        if attention and self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head size {head_dim} not in {sorted(self.head_dims)}")
        if attention and relative_scores and not self.relative_scores:
            reasons.append(f"no relative-position score terms (rel=) in its {op}")
        lacking = sorted((features & OPS[op].uses) - self.features) if op is not None else []
        if lacking:
            reasons.append(f"no {' or '.join(lacking)} in its {op}")
        if op is not None and OPS[op].product and products not in self.products:
            reasons.append(f"no {products} products")
        if self.needs_plan and device.type == "cpu" and not getattr(plan := plan or cpu.current(), self.needs_plan):
            reasons.append(plan.reasons[self.needs_plan])
        if self.needs_native and not reasons and native.module() is None:
            reasons.append(f"padfree's native module is unavailable ({native.why_not()})")
        if self.requires and importlib.util.find_spec(self.requires) is None:
            reasons.append(f"package {self.requires!r} is not installed")
        if self.needs_mkldnn and not torch.backends.mkldnn.is_available():
            reasons.append("this PyTorch build has no oneDNN (mkldnn)")
        if self.needs_mkldnn and dtype == torch.bfloat16 and device.type == "cpu" \
                and not (plan := plan or cpu.current()).onednn_bf16:
            reasons.append(f"this CPU has no oneDNN bf16 support ({plan.reasons['onednn_bf16']})")
        return reasons

    def function(self, op: str, plan: CpuPlan | None = None) -> Callable:
        """The backend's function for ``op``; with ``takes_plan``, bound to ``plan`` (default: this machine's)."""
        fn = getattr(importlib.import_module(self.module), op)
        return functools.partial(fn, plan=plan or cpu.current()) if self.takes_plan else fn


_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

# Priority order: the first backend that validates is chosen under backend="auto".
BACKENDS: list[Backend] = [
    # every primitive as a Triton kernel: rotary (Q and K rotated as the attention loads them) and the sliding
    # window (each query block visits only the key blocks of its band) in the attention, LayerNorms without bias
    # (embedding and residual), gated activations (GeGLU, SwiGLU) and RMSNorm, so ModernBERT, NomicBERT and
    # EuroBERT run on it whole; what it still lacks is a window together with relative-position terms (rel=)
    Backend("triton", frozenset({"cuda"}), _FLOATS, "padfree.ops.triton_backend", frozenset(PRIMITIVES),
            head_dims=frozenset({16, 32, 64, 80, 96, 128}), requires="triton", relative_scores=True,
            features=_ATTENTION_FEATURES | {"norm_without_bias"}),
    # fused linear ops and the embedding; fp16 on CPU has no fast oneDNN path here, so it is left to the
    # composition; its attention is the torch backend's (so it takes rel=)
    Backend("onednn", frozenset({"cpu"}), frozenset({torch.float32, torch.bfloat16}), "padfree.ops.onednn_backend",
            frozenset(FUSED_OPS) | {"embed_layer_norm"}, needs_mkldnn=True, relative_scores=True,
            primitives_from="torch", features=_ATTENTION_FEATURES | {"norm_without_bias"}, takes_plan=True),
    # every product op with int8 weights and per-token int8 activations on the native module's kernels (the pooler
    # in fp32: a few rows); its primitives, the attention among them, are the torch backend's, in fp32
    Backend("int8", frozenset({"cpu"}), frozenset({torch.float32}), "padfree.ops.int8_backend",
            frozenset(name for name, op in OPS.items() if op.product), relative_scores=True, primitives_from="torch",
            features=_ATTENTION_FEATURES, takes_plan=True, products=frozenset({"int8"}), needs_plan="int8_isa",
            needs_native=True),
    Backend("torch", frozenset({"cpu", "cuda"}), _FLOATS, "padfree.ops.torch_backend", frozenset(PRIMITIVES),
            relative_scores=True, features=_ATTENTION_FEATURES | {"norm_without_bias"}),
]


def _reasons(reasons: dict[str, list[str]]) -> str:
    return "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())


def _candidates(op: str, device: torch.device, dtype: torch.dtype, head_dim: int | None, backend: str,
                relative_scores: bool, features: frozenset[str], plan: CpuPlan | None, products: str
                ) -> tuple[list[Backend], dict[str, list[str]]]:
    """The backends to try for ``op`` in order, and the reasons already known against the others."""
    if backend == "auto":
        return list(BACKENDS), {}
    named = [b for b in BACKENDS if b.name == backend]
    if not named:
        raise ValueError(f"unknown backend {backend!r}; known: {['auto'] + [b.name for b in BACKENDS]}")
    b = named[0]
    if op in b.ops or b.primitives_from is None or op not in PRIMITIVES:
        return [b], {}
    # a backend of fused ops only, named alone, runs with another's primitives; only where it can run itself
    why = b.validate(None, device, dtype, head_dim, relative_scores, features, plan, products)
    return ([] if why else [x for x in BACKENDS if x.name == b.primitives_from]), ({b.name: why} if why else {})


def select(op: str, device: torch.device | str, dtype: torch.dtype, head_dim: int | None = None,
           backend: str = "auto", relative_scores: bool = False, features: frozenset[str] = frozenset(),
           plan: CpuPlan | None = None, products: str = "float") -> tuple[str, Callable]:
    """``(backend name, function)`` for ``op``, the one way kernels are resolved (``Kernels.resolve`` calls it
    for each op; the per-call functions of ``padfree.ops`` too). A fused op no candidate implements is
    composed from F.linear and its primitive, named ``composed(<backend>)`` after the primitive's backend (one whose
    composition calls none: after its ``named_after``'s). ``ValueError`` with every reason
    when nothing fits, or when a named backend cannot run (there is no silent fallback).

    ``relative_scores``: the model passes relative-position score terms to the attention; ``features``: the
    model's other needs (``ModelConfig.features``: rotary, sliding window, LayerNorm without bias), which every
    chosen backend must handle in the ops that use them (``Op.uses``); ``plan``: the CPU plan the CPU backend's
    functions are bound to and validated against (default: this machine's, :func:`padfree.cpu.current`);
    ``products``: "float", or "int8" for a model whose product ops run on int8 weights (never composed: F.linear
    is a float product)."""
    device = torch.device(device)
    spec = OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; ops: {list(OPS)}")
    features = frozenset(features)
    if products not in ("float", "int8"):
        raise ValueError(f"unknown products {products!r}; known: float, int8")
    candidates, reasons = _candidates(op, device, dtype, head_dim, backend, relative_scores, features, plan,
                                      products)
    for b in candidates:
        why = b.validate(op, device, dtype, head_dim, relative_scores, features, plan, products)
        if not why:
            log.info("padfree: %s uses backend %s%s", op, b.name, f" ({_reasons(reasons)})" if reasons else "")
            return b.name, b.function(op, plan)
        reasons[b.name] = why
    if spec.compose is not None and not (spec.product and products != "float"):
        primitive = spec.composed_from or spec.named_after
        try:
            name, fn = select(primitive, device, dtype, head_dim, backend, relative_scores, features, plan)
        except ValueError as e:
            raise ValueError(f"no backend can run {op} on {device.type} with {dtype}: {_reasons(reasons)}; "
                             f"and composing it failed: {e}") from None
        if spec.composed_from is None:
            log.info("padfree: %s composed of torch ops, beside %s's (%s)", op, name, _reasons(reasons))
            return f"composed({name})", spec.compose()
        log.info("padfree: %s composed from F.linear and %s (%s)", op, name, _reasons(reasons))
        return f"composed({name})", spec.compose(fn)
    raise ValueError(f"no backend can run {op} on {device.type} with {dtype}"
                     f"{'' if products == 'float' else f' and {products} products'}"
                     f"{'' if head_dim is None else f' and head size {head_dim}'}: {_reasons(reasons)}")


class Kernels:
    """The function of every op in :data:`OPS` for one encoder, resolved once by :func:`select` (no per-call
    dispatch): ``kernels.<op>(...)``; ``names`` says which backend runs each."""

    def __init__(self, fns: dict[str, Callable], names: dict[str, str], features: frozenset[str] = frozenset()):
        missing = set(needed_ops(features)) - set(fns)
        if missing:
            raise ValueError(f"Kernels needs a function for every op; missing {sorted(missing)}")
        self.__dict__.update(fns)  # plain attributes: the forward's lookups cost what a dataclass field does
        self.names = names

    @classmethod
    def resolve(cls, device, dtype: torch.dtype, head_dim: int, backend: str = "auto",
                relative_scores: bool = False, features: frozenset[str] = frozenset(),
                plan: CpuPlan | None = None, products: str = "float") -> "Kernels":
        chosen = {op: select(op, device, dtype, head_dim, backend, relative_scores, features, plan, products)
                  for op in needed_ops(features)}
        return cls({op: fn for op, (_, fn) in chosen.items()}, {op: n for op, (n, _) in chosen.items()}, features)


def needed_ops(features: frozenset[str]) -> list[str]:
    """The ops a model with these features calls: every op, less those only other models need."""
    return [name for name, op in OPS.items() if op.only_for is None or op.only_for in features]
