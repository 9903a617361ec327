"""Variable-length fused multi-head self-attention in Triton (FlashAttention-style, padding-free).

Input: packed ``qkv [T, 3*H]`` whose rows are laid out ``[3, heads, head_dim]`` (Q | K | V), an optional
QKV bias ``[3*H]``, ``cu_seqlens [B+1]`` int32 on the device and the host int ``max_seqlen``.
Output: the context ``[T, H]`` in qkv's dtype.

One program computes one block of ``BLOCK_M`` queries of one (sequence, head). It streams the keys and values
of its own sequence in blocks of ``BLOCK_N`` with an online softmax (running max and sum in fp32, exp2 with the
scale folded in), so no ``S x S`` matrix is ever stored. The grid is ``(cdiv(max_seqlen, BLOCK_M), B, heads)``,
sized from the host int alone; a program whose block starts past its sequence's end returns at once. Nothing is
read back to the host, so a forward can be captured in a CUDA graph.

Bias, exactly and for free: the Q bias is added to Q as it is loaded. The K bias adds ``q . b_k`` to every
logit of a query row, a constant that softmax cancels, so it is skipped (this is exact algebra, and avoids a
rounding of ``k + b_k`` in low precision). Since each softmax row sums to one, the V bias adds ``b_v`` to every
output row, so it is added once to the result instead of to every V block.

Short sequences (``max_seqlen <= SHORT_MAX``) take a single-tile path: the whole key range of a sequence is one
tile and the softmax is computed directly (no running rescale). Block sizes come from measurements (see
``attention_config``).
"""
from __future__ import annotations

import math
import numbers
import os

import torch
import triton
import triton.language as tl

from .reference import varlen_attention_ref  # noqa: F401  (the definition of this op)

HEAD_DIMS = (16, 32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634
_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ----------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation. The CPU interpreter multiplies bf16 bit patterns as integers,
    so there the operands (already rounded to their dtype) are widened to fp32 first."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attn_kv_block(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d, seqlen, stride_row, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One step of the online softmax over keys ``start_n + offs_n``; returns the updated (acc, l_i, m_i)."""
    cols = start_n + offs_n  # [BLOCK_N] key positions inside the sequence
    ptr_off = cols[:, None] * stride_row + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASK_N:
        if BLOCK_D != HEAD_DIM:
            mask = (cols[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        else:
            mask = cols[:, None] < seqlen
        k = tl.load(k_base + ptr_off, mask=mask, other=0.0)
        v = tl.load(v_base + ptr_off, mask=mask, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            mask = offs_d[None, :] < HEAD_DIM
            k = tl.load(k_base + ptr_off, mask=mask, other=0.0)
            v = tl.load(v_base + ptr_off, mask=mask, other=0.0)
        else:
            k = tl.load(k_base + ptr_off)
            v = tl.load(v_base + ptr_off)
    qk = _mma(q, tl.trans(k), None, PRECISION, INTERPRET)  # [BLOCK_M, BLOCK_N] fp32 logits (unscaled)
    if MASK_N:
        qk = tl.where(cols[None, :] < seqlen, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # running max, in log2 units
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescale of what was accumulated so far
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mma(p.to(v.dtype), v, acc, PRECISION, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _varlen_attention_kernel(qkv_ptr, bias_ptr, out_ptr, cu_seqlens_ptr, stride_row, stride_out, qk_scale,
                             NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_TILE: tl.constexpr,
                             HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if pid_m * BLOCK_M >= seqlen:
        return
    hidden: tl.constexpr = NUM_HEADS * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions inside the sequence
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit base of this sequence's first row; offsets inside one sequence fit in 32 bits
    row0 = seq_start.to(tl.int64)
    q_base = qkv_ptr + row0 * stride_row + head * HEAD_DIM
    k_base = q_base + hidden
    v_base = q_base + 2 * hidden

    if BLOCK_D != HEAD_DIM:
        q_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = offs_m[:, None] < seqlen
    q = tl.load(q_base + offs_m[:, None] * stride_row + offs_d[None, :], mask=q_mask, other=0.0)
    if HAS_BIAS:
        bq = tl.load(bias_ptr + head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        q = (q.to(tl.float32) + bq.to(tl.float32)[None, :]).to(q.dtype)

    if SINGLE_TILE:
        # the whole sequence's keys in one tile: plain softmax, no running rescale
        ptr_off = offs_n[:, None] * stride_row + offs_d[None, :]
        if BLOCK_D != HEAD_DIM:
            kv_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_n[:, None] < seqlen
        k = tl.load(k_base + ptr_off, mask=kv_mask, other=0.0)
        v = tl.load(v_base + ptr_off, mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), None, PRECISION, INTERPRET)
        qk = tl.where(offs_n[None, :] < seqlen, qk, float("-inf"))
        m_i = tl.max(qk, 1) * qk_scale
        p = tl.exp2(qk * qk_scale - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, None, PRECISION, INTERPRET)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_full = (seqlen // BLOCK_N) * BLOCK_N  # keys [0, n_full) need no bounds mask
        if INTERPRET:  # Triton's CPU interpreter cannot take a tensor as range() bound under numpy >= 2.4
            start_n = 0
            while start_n < n_full:
                acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d,
                                               seqlen, stride_row, qk_scale, HEAD_DIM, BLOCK_D, False, PRECISION,
                                               INTERPRET)
                start_n += BLOCK_N
        else:
            for start_n in range(0, n_full, BLOCK_N):
                acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, k_base, v_base, start_n, offs_n, offs_d,
                                               seqlen, stride_row, qk_scale, HEAD_DIM, BLOCK_D, False, PRECISION,
                                               INTERPRET)
        if n_full < seqlen:
            acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, k_base, v_base, n_full, offs_n, offs_d, seqlen,
                                           stride_row, qk_scale, HEAD_DIM, BLOCK_D, True, PRECISION, INTERPRET)

    acc = acc / l_i[:, None]
    if HAS_BIAS:
        bv = tl.load(bias_ptr + 2 * hidden + head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        acc = acc + bv.to(tl.float32)[None, :]
    o_ptrs = out_ptr + row0 * stride_out + head * HEAD_DIM + offs_m[:, None] * stride_out + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
# Launch configurations, measured on an H100 (benchmarks/gpu_kernels.py --tune; BERT-base shape, batch 16,
# lengths U[0.2 max, max], CUDA-graph timing): the single-tile path wins only up to 64 tokens (3.6 vs 4.0 us
# at max 64; tied at 128); 64x64 tiles, 4 warps, 3 stages lead the streaming path from 128 to 1024 tokens
# (64x32 tiles are 7% faster at 256), for head size 128 too; 8 warps or 128-row tiles were 10-130% slower.
SHORT_MAX = 64  # max_seqlen up to which the single-tile path is used


def _interpreting() -> bool:
    """True under Triton's CPU interpreter (``TRITON_INTERPRET=1``), read at each launch."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def attention_config(max_seqlen: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options for a problem (see the measurements above)."""
    if _interpreting():  # the CPU interpreter: small tiles keep tests fast
        block_n = max(16, triton.next_power_of_2(max_seqlen))
        if max_seqlen <= 32:
            return dict(block_m=16, block_n=block_n, single_tile=True, num_warps=1, num_stages=1)
        return dict(block_m=16, block_n=16, single_tile=False, num_warps=1, num_stages=1)
    if max_seqlen <= SHORT_MAX:
        block_n = max(16, triton.next_power_of_2(max_seqlen))
        return dict(block_m=block_n, block_n=block_n, single_tile=True, num_warps=4, num_stages=1)
    if dtype == torch.float32:  # fp32 operands take twice the shared memory and registers
        return dict(block_m=64, block_n=32, single_tile=False, num_warps=4, num_stages=2)
    return dict(block_m=64, block_n=32 if max_seqlen <= 256 else 64, single_tile=False, num_warps=4,
                num_stages=3)


def _check(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias):
    if qkv.dim() != 2 or qkv.shape[1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv must be [T, 3*heads*head_dim] with {num_heads} heads; got {tuple(qkv.shape)}")
    head_dim = qkv.shape[1] // 3 // num_heads
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head size {head_dim} not supported by the Triton attention; supported: {HEAD_DIMS}")
    if qkv.dtype not in _DOT_DTYPES:
        raise ValueError(f"dtype {qkv.dtype} not supported; supported: {sorted(map(str, _DOT_DTYPES))}")
    if qkv.stride(1) != 1:
        raise ValueError("qkv's last dimension must be contiguous")
    if (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.stride(0) != 1
            or cu_seqlens.device != qkv.device):
        raise ValueError(f"cu_seqlens must be a contiguous 1-D int32 tensor on {qkv.device}; got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    if qkv_bias is not None and (qkv_bias.shape != (qkv.shape[1],) or qkv_bias.device != qkv.device
                                 or not qkv_bias.is_contiguous()):
        raise ValueError(f"qkv_bias must be a contiguous [{qkv.shape[1]}] on {qkv.device}; got "
                         f"{tuple(qkv_bias.shape)} on {qkv_bias.device}")
    if isinstance(max_seqlen, torch.Tensor) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a host int >= 0 (a tensor would need a device sync); "
                         f"got {max_seqlen!r}")
    return head_dim


def launch_varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias=None, scale=None, *, block_m,
                            block_n, single_tile, num_warps, num_stages):
    """Launch the kernel with explicit block sizes (tests and benchmarks; :func:`varlen_attention` picks them)."""
    head_dim = _check(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias)
    return _launch(qkv, cu_seqlens, int(max_seqlen), num_heads, head_dim, qkv_bias, scale, block_m, block_n,
                   single_tile, num_warps, num_stages)


def _launch(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, qkv_bias, scale, block_m, block_n, single_tile,
            num_warps, num_stages):
    T = qkv.shape[0]
    hidden = num_heads * head_dim
    out = torch.empty(T, hidden, dtype=qkv.dtype, device=qkv.device)
    batch = cu_seqlens.shape[0] - 1
    if T == 0 or batch == 0 or max_seqlen == 0:
        return out
    if single_tile and block_n < max_seqlen:
        raise ValueError(f"single-tile attention needs block_n >= max_seqlen ({block_n} < {max_seqlen})")
    if batch > 65535 or num_heads > 65535:
        raise ValueError(f"at most 65535 sequences and heads per call; got {batch} and {num_heads}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    grid = (triton.cdiv(max_seqlen, block_m), batch, num_heads)
    _varlen_attention_kernel[grid](
        qkv, qkv if qkv_bias is None else qkv_bias, out, cu_seqlens, qkv.stride(0), out.stride(0), scale * LOG2E,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single_tile, HAS_BIAS=qkv_bias is not None,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", INTERPRET=_interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    return out


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------
def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """See :func:`padfree.ops.reference.varlen_attention_ref`. ``[T, 3H]`` -> ``[T, H]``; no host sync."""
    head_dim = _check(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias)
    max_seqlen = int(max_seqlen)
    cfg = attention_config(max_seqlen, head_dim, qkv.dtype)
    return _launch(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, qkv_bias, scale, **cfg)
