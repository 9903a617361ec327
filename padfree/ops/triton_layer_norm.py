"""``LayerNorm(x + bias + residual)`` and ``RMSNorm(x)`` in Triton: one pass over memory, fp32 statistics.

Each program normalises ``ROWS`` rows held whole in registers (``BLOCK`` = the row length rounded up to a power
of two, masked): it reads x, residual (and the bias, weight and LayerNorm bias once), writes the output, and
never re-reads a row. Mean and variance are taken in fp32 by two passes over the registers (no E[x^2] - E[x]^2
cancellation). The LayerNorm bias is optional (ModernBERT's norms have none). RMSNorm (EuroBERT) is the same row
layout: ``x / sqrt(mean(x^2) + eps) * weight``, its mean of squares in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import add_bias_residual_layer_norm_ref, rms_norm_ref  # noqa: F401  (the definitions)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HIDDEN = 16384  # whole rows live in registers


# ----------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_store(y, mask, cols, col_ok, n_cols, eps, w_ptr, b_ptr, out_rows, HAS_LN_BIAS: tl.constexpr):
    """LayerNorm of the fp32 tile ``y [ROWS, BLOCK]`` (statistics over its ``n_cols`` valid columns), stored at
    ``out_rows [ROWS, 1]`` (each row's output pointer) + ``cols``; ``HAS_LN_BIAS``: add ``b_ptr`` (else no bias).
    Shared by the embedding kernel."""
    mean = tl.sum(y, 1) / n_cols  # [ROWS]
    centred = tl.where(mask, y - mean[:, None], 0.0)
    var = tl.sum(centred * centred, 1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = centred * rstd[:, None] * w[None, :]
    if HAS_LN_BIAS:
        out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_rows + cols[None, :], out.to(out_rows.dtype.element_ty), mask=mask)


@triton.jit
def _add_bias_residual_layer_norm_kernel(x_ptr, bias_ptr, res_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_cols,
                                         stride_x, stride_res, stride_out, eps,
                                         HAS_BIAS: tl.constexpr, HAS_LN_BIAS: tl.constexpr, ROWS: tl.constexpr,
                                         BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y += tl.load(res_ptr + rows64 * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _layer_norm_store(y, mask, cols, col_ok, n_cols, eps, w_ptr, b_ptr, out_ptr + rows64 * stride_out, HAS_LN_BIAS)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    y = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / n_cols + eps)  # [ROWS]; masked columns are 0
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = y * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows64 * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
def row_config(n_cols: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for row-wise kernels over rows of ``n_cols`` elements (shared with embedding)."""
    block = triton.next_power_of_2(max(n_cols, 16))
    rows = max(1, min(16, 2048 // block))  # ~2K elements per program for short rows
    num_warps = min(16, max(4, block * rows * elem_size // 2048))
    return block, rows, num_warps


def _check_rows(x, what: str) -> int:
    """``x`` is a ``[T, H]`` the row kernels take; returns H."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"dtype {x.dtype} not supported; supported: {[str(d) for d in _DTYPES]}")
    if x.shape[1] > MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[1]} > {MAX_HIDDEN} not supported by the Triton {what}")
    return x.shape[1]


def _check(x, bias, residual, weight, ln_bias):
    H = _check_rows(x, "LayerNorm")
    if residual.shape != x.shape:
        raise ValueError(f"residual must be {tuple(x.shape)}; got {tuple(residual.shape)}")
    if weight is None:
        raise ValueError("weight is required")
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if t is not None and (t.shape != (H,) or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous [{H}]; got {tuple(t.shape)}")
    for name, t in (("residual", residual), ("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def launch_add_bias_residual_layer_norm(x, bias, residual, weight, ln_bias, eps):
    _check(x, bias, residual, weight, ln_bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual.stride(1) != 1:
        residual = residual.contiguous()
    T, H = x.shape
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block, rows, num_warps = row_config(H, x.element_size())
    _add_bias_residual_layer_norm_kernel[(triton.cdiv(T, rows),)](
        x, x if bias is None else bias, residual, weight, weight if ln_bias is None else ln_bias, out, T, H,
        x.stride(0), residual.stride(0), out.stride(0), float(eps),
        HAS_BIAS=bias is not None, HAS_LN_BIAS=ln_bias is not None, ROWS=rows, BLOCK=block, num_warps=num_warps)
    return out


def launch_rms_norm(x, weight, eps):
    H = _check_rows(x, "RMSNorm")
    T = x.shape[0]
    if weight is None or weight.shape != (H,) or not weight.is_contiguous() or weight.device != x.device:
        raise ValueError(f"weight must be a contiguous [{H}] on {x.device}")
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block, rows, num_warps = row_config(H, x.element_size())
    _rms_norm_kernel[(triton.cdiv(T, rows),)](x, weight, out, T, H, x.stride(0), out.stride(0), float(eps),
                                              ROWS=rows, BLOCK=block, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------
def add_bias_residual_layer_norm(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                 weight: torch.Tensor, ln_bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """See :func:`padfree.ops.reference.add_bias_residual_layer_norm_ref`: ``[T, H]`` in x's dtype;
    ``ln_bias=None``: a LayerNorm without bias."""
    return launch_add_bias_residual_layer_norm(x, bias, residual, weight, ln_bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See :func:`padfree.ops.reference.rms_norm_ref`: ``x / sqrt(mean(x^2) + eps) * weight``, ``[T, H]`` in x's
    dtype, fp32 statistics."""
    return launch_rms_norm(x, weight, eps)
