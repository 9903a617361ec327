"""Backend registry: which implementation of each op runs for a device, dtype and head size.

Each backend declares what it supports as data; :meth:`Backend.validate` returns the reasons it cannot run
a given case. :func:`select` walks the priority list and returns the first backend that fits, logging the
choice; if none fits (or a named backend does not), it raises one ``ValueError`` listing every reason.
Kernel modules are imported only when a backend is chosen, so a missing Triton never breaks ``import padfree``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger("padfree")

OPS = ("varlen_attention", "add_bias_residual_layer_norm", "bias_act", "embed_layer_norm")

# Fused ops: a linear together with what consumes its output. A backend may implement them (the CPU oneDNN
# backend does, with the matrix-product epilogues); where none does, Kernels composes them from F.linear and the
# primitives it resolved, so a backend that only has the primitives (Triton) runs exactly as before.
FUSED_OPS = ("qkv_varlen_attention", "linear_bias_act", "linear_residual_layer_norm")


@dataclass(frozen=True)
class Backend:
    name: str
    devices: frozenset[str]                  # device types it runs on ("cpu", "cuda")
    dtypes: frozenset[torch.dtype]
    module: str                              # module holding one function per op it implements
    ops: frozenset[str]                      # which of OPS it implements
    head_dims: frozenset[int] | None = None  # attention head sizes it supports; None = any
    requires: str | None = None              # a Python package it needs (checked lazily)
    relative_scores: bool = False            # its varlen_attention accepts ``rel=`` (relative-position score
                                             # terms: MPNet's bias, DeBERTa's c2p/p2c)
    needs_mkldnn: bool = False               # runs on PyTorch's oneDNN (mkldnn) CPU build

    def validate(self, op: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
                 relative_scores: bool = False) -> list[str]:
        """Every reason this backend cannot run ``op`` here (empty list = it can).

        ``relative_scores``: the caller will pass relative-position score terms to ``varlen_attention``."""
        reasons = []
        if op not in self.ops:
            reasons.append(f"does not implement {op}")
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not in {sorted(self.devices)}")
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} not in {sorted(str(d) for d in self.dtypes)}")
        if op == "varlen_attention" and self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head size {head_dim} not in {sorted(self.head_dims)}")
        if op in ("varlen_attention", "qkv_varlen_attention") and relative_scores and not self.relative_scores:
            reasons.append(f"no relative-position score terms (rel=) in its {op}")
        if self.requires and importlib.util.find_spec(self.requires) is None:
            reasons.append(f"package {self.requires!r} is not installed")
        if self.needs_mkldnn and not torch.backends.mkldnn.is_available():
            reasons.append("this PyTorch build has no oneDNN (mkldnn)")
        if self.needs_mkldnn and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            reasons.append("this CPU has no oneDNN bf16 support")
        return reasons

    def function(self, op: str) -> Callable:
        return getattr(importlib.import_module(self.module), op)


_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})

# Priority order: the first backend that validates is chosen under backend="auto".
BACKENDS: list[Backend] = [
    Backend("triton", frozenset({"cuda"}), _FLOATS, "padfree.ops.triton_backend", frozenset(OPS),
            head_dims=frozenset({16, 32, 64, 80, 96, 128}), requires="triton", relative_scores=True),
    # fused linear ops only; fp16 on CPU has no fast oneDNN path here, so it is left to the composition
    Backend("onednn", frozenset({"cpu"}), frozenset({torch.float32, torch.bfloat16}), "padfree.ops.onednn_backend",
            frozenset(FUSED_OPS), needs_mkldnn=True, relative_scores=True),  # its attention is the torch backend's
    Backend("torch", frozenset({"cpu", "cuda"}), _FLOATS, "padfree.ops.torch_backend", frozenset(OPS),
            relative_scores=True),
]


def select(op: str, device: torch.device | str, dtype: torch.dtype, head_dim: int | None = None,
           backend: str = "auto", relative_scores: bool = False) -> tuple[str, Callable]:
    """``(backend name, function)`` for ``op``; ``ValueError`` with every reason when nothing fits.

    ``relative_scores``: the model passes relative-position score terms to ``varlen_attention``."""
    device = torch.device(device)
    candidates = BACKENDS if backend == "auto" else [b for b in BACKENDS if b.name == backend]
    if not candidates:
        raise ValueError(f"unknown backend {backend!r}; known: {['auto'] + [b.name for b in BACKENDS]}")
    reasons = {}
    for b in candidates:
        why = b.validate(op, device, dtype, head_dim, relative_scores)
        if not why:
            if reasons:
                log.info("padfree: %s uses backend %s (%s)", op, b.name,
                         "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items()))
            else:
                log.info("padfree: %s uses backend %s", op, b.name)
            return b.name, b.function(op)
        reasons[b.name] = why
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in reasons.items())
    raise ValueError(f"no backend can run {op} on {device.type} with {dtype}"
                     f"{'' if head_dim is None else f' and head size {head_dim}'}: {detail}")


@dataclass(frozen=True)
class Kernels:
    """The functions an encoder calls, resolved once at construction (no per-call dispatch)."""
    varlen_attention: Callable
    add_bias_residual_layer_norm: Callable
    bias_act: Callable
    embed_layer_norm: Callable
    qkv_varlen_attention: Callable
    """``(x [T, H], weight [3H, H], bias, cu_seqlens, max_seqlen, num_heads, scale=None, rel=None, runs=None)``
    -> context ``[T, H]`` (``rel``: relative-position score terms, passed only by the models that have them;
    ``runs``: the batch's host-known runs of equal lengths, ``PackedBatch.runs``)."""
    linear_bias_act: Callable
    """``(x [T, K], weight [N, K], bias, activation)`` -> ``act(x W^T + b)`` ``[T, N]``."""
    linear_residual_layer_norm: Callable
    """``(x [T, K], weight [N, K], bias, residual [T, N], ln_weight, ln_bias, eps)`` -> ``[T, N]``."""
    names: dict

    @classmethod
    def resolve(cls, device, dtype: torch.dtype, head_dim: int, backend: str = "auto",
                relative_scores: bool = False) -> "Kernels":
        chosen = {op: select(op, device, dtype, head_dim, backend, relative_scores) for op in OPS}
        fns = {op: fn for op, (_, fn) in chosen.items()}
        names = {op: n for op, (n, _) in chosen.items()}
        for op in FUSED_OPS:
            try:
                names[op], fns[op] = select(op, device, dtype, head_dim, backend, relative_scores)
            except ValueError:  # no backend fuses it here: compose it from the primitives just resolved
                names[op], fns[op] = f"composed({names[_FUSED_FROM[op]]})", _compose(op, fns)
                log.info("padfree: %s composed from F.linear and %s", op, names[_FUSED_FROM[op]])
        return cls(**fns, names=names)


_FUSED_FROM = {"qkv_varlen_attention": "varlen_attention", "linear_bias_act": "bias_act",
               "linear_residual_layer_norm": "add_bias_residual_layer_norm"}


def _compose(op: str, fns: dict[str, Callable]) -> Callable:
    """The fused op as F.linear followed by the resolved primitive (the bias goes to the primitive)."""
    import torch.nn.functional as F
    attention, bias_act, add_ln = fns["varlen_attention"], fns["bias_act"], fns["add_bias_residual_layer_norm"]
    if op == "qkv_varlen_attention":
        def qkv_varlen_attention(x, w, b, cu, max_seqlen, heads, scale=None, rel=None, runs=None):
            # the QKV bias goes into the attention op (Triton adds it as it loads); rel= only where there is one,
            # so a backend without relative terms keeps its plain signature
            return attention(F.linear(x, w), cu, max_seqlen, heads, b, scale, runs=runs,
                             **({} if rel is None else {"rel": rel}))
        return qkv_varlen_attention
    if op == "linear_bias_act":
        return lambda x, w, b, activation: bias_act(F.linear(x, w), b, activation)
    return lambda x, w, b, residual, ln_w, ln_b, eps: add_ln(F.linear(x, w), b, residual, ln_w, ln_b, eps)
