"""Activation functions by name: the config's name is mapped once to one of padfree's canonical names."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Hugging Face `hidden_act` / `activation` names -> padfree's canonical name.
HF_ACTIVATIONS = {
    "gelu": "gelu",                 # erf GELU (BERT, RoBERTa, ...)
    "gelu_new": "gelu_tanh",        # tanh approximation (ALBERT, GPT-2 style)
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",       # same tanh formula, written with a folded constant
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",     # x * sigmoid(1.702 x)
}
ACTIVATIONS = frozenset(HF_ACTIVATIONS.values())


def canonical_activation(name: str) -> str:
    """The canonical name for a config's activation; ``ValueError`` naming it if padfree lacks it."""
    if name in ACTIVATIONS:
        return name
    try:
        return HF_ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(HF_ACTIVATIONS)}") from None


def apply_activation(x: torch.Tensor, activation: str, inplace: bool = False) -> torch.Tensor:
    """Apply a canonical activation. ``inplace``: overwrite ``x`` (a tensor the caller owns, e.g. a product just
    computed) and return it: no output to allocate, which at a handful of tokens costs more than the activation."""
    if activation == "gelu":
        return torch.ops.aten.gelu_(x) if inplace else F.gelu(x)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_(x, approximate="tanh") if inplace else F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x, inplace=inplace)
    if activation == "silu":
        return F.silu(x, inplace=inplace)
    if activation == "quick_gelu":
        gate = torch.sigmoid(1.702 * x)
        return x.mul_(gate) if inplace else x * gate
    raise ValueError(f"unknown canonical activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
