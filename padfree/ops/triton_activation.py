"""``act(x + bias)`` and the gated ``act(input) * gate`` in Triton for every canonical activation (see
:mod:`padfree.ops.activations`).

One pass over memory: each program reads a ``[ROWS, BLOCK_C]`` tile of x and the matching slice of the bias,
computes in fp32 and writes the tile in x's dtype. The sigmoid-shaped activations are written with one ``exp``:
``gelu_tanh(x) = x * sigmoid(2u)`` with ``u = sqrt(2/pi) (x + 0.044715 x^3)`` (the same function as
``0.5 x (1 + tanh u)``), ``silu(x) = x * sigmoid(x)``, ``quick_gelu(x) = x * sigmoid(1.702 x)``.

The gated kernel (GeGLU, SwiGLU: ModernBERT, NomicBERT, EuroBERT) reads the two halves of ``x + bias = [input |
gate]`` ``[T, 2F]`` tile by tile (column c and column F + c) and writes ``act(input) * gate`` ``[T, F]``: the
``[T, 2F]`` sum is never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activations import ACTIVATIONS
from .reference import bias_act_ref, gated_act_ref  # noqa: F401  (the definitions of these ops)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3, "quick_gelu": 4}
assert set(_ACT_CODES) == set(ACTIVATIONS), "every canonical activation needs a kernel code"


# ----------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _x_sigmoid(x, k):
    """``x * sigmoid(k)``, written so that a large ``-k`` gives ``x / inf = 0`` rather than a NaN."""
    return x / (1.0 + tl.exp(-k))


@triton.jit
def _activate(x, ACT: tl.constexpr):
    """The canonical activation ``ACT`` (a code of ``_ACT_CODES``) of the fp32 tile ``x``."""
    if ACT == 0:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:  # gelu_tanh: 0.5 x (1 + tanh u) = x sigmoid(2u)
        y = _x_sigmoid(x, 1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACT == 2:  # relu
        y = tl.maximum(x, 0.0)
    elif ACT == 3:  # silu
        y = _x_sigmoid(x, x)
    else:  # quick_gelu
        y = _x_sigmoid(x, 1.702 * x)
    return y


@triton.jit
def _bias_act_kernel(x_ptr, bias_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    col_ok = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _activate(x, ACT)
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_kernel(x_ptr, bias_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                      ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[:, c] = act(x[:, c] + b[c]) * (x[:, F + c] + b[F + c])`` for ``n_cols = F`` output columns."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C] output columns
    col_ok = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_rows + n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        gate += tl.load(bias_ptr + n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = _activate(x, ACT) * gate
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * stride_out
    tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
def _check(x, bias, activation):
    if activation not in _ACT_CODES:
        raise ValueError(f"unknown canonical activation {activation!r}; expected one of {sorted(_ACT_CODES)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"dtype {x.dtype} not supported; supported: {[str(d) for d in _DTYPES]}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, F]; got {tuple(x.shape)}")
    T, F = x.shape
    if bias is not None and (bias.shape != (F,) or not bias.is_contiguous() or bias.device != x.device):
        raise ValueError(f"bias must be a contiguous [{F}] on {x.device}; got {tuple(bias.shape)} on {bias.device}")
    return x if x.stride(1) == 1 else x.contiguous()


def _grid(T, F):
    """``(grid, ROWS, BLOCK_C)`` for an elementwise pass producing ``[T, F]``: 4K elements per program."""
    block_c = min(1024, triton.next_power_of_2(F))
    rows = max(1, 4096 // block_c)
    grid = (triton.cdiv(T, rows), triton.cdiv(F, block_c))
    if grid[1] > 65535:
        raise ValueError(f"row length {F} too large")
    return grid, rows, block_c


def launch_bias_act(x, bias, activation):
    x = _check(x, bias, activation)
    T, F = x.shape
    out = torch.empty(T, F, dtype=x.dtype, device=x.device)
    if T == 0 or F == 0:
        return out
    grid, rows, block_c = _grid(T, F)
    _bias_act_kernel[grid](x, x if bias is None else bias, out, T, F, x.stride(0), out.stride(0),
                           ACT=_ACT_CODES[activation], HAS_BIAS=bias is not None, ROWS=rows, BLOCK_C=block_c,
                           num_warps=8)
    return out


def launch_gated_act(x, bias, activation):
    x = _check(x, bias, activation)
    T, F2 = x.shape
    if F2 % 2:
        raise ValueError(f"x must be [T, 2F] = [input | gate]; got an odd width {F2}")
    F = F2 // 2
    out = torch.empty(T, F, dtype=x.dtype, device=x.device)
    if T == 0 or F == 0:
        return out
    grid, rows, block_c = _grid(T, F)
    _gated_act_kernel[grid](x, x if bias is None else bias, out, T, F, x.stride(0), out.stride(0),
                            ACT=_ACT_CODES[activation], HAS_BIAS=bias is not None, ROWS=rows, BLOCK_C=block_c,
                            num_warps=8)
    return out


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------
def bias_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """See :func:`padfree.ops.reference.bias_act_ref`: ``act(x + bias)``, ``[T, F]`` in x's dtype."""
    return launch_bias_act(x, bias, activation)


def gated_act(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """See :func:`padfree.ops.reference.gated_act_ref`: ``act(input) * gate`` of ``x + bias = [input | gate]``,
    ``[T, 2F]`` -> ``[T, F]`` in x's dtype."""
    return launch_gated_act(x, bias, activation)
