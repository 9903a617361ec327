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

Relative positions (MPNet's bucketed bias, DeBERTa's content-to-position and position-to-content terms) are
added to each tile's logits from small tables, by a gather on ``r = index[i - j + max_seqlen - 1]``: the bias
from ``[heads, R]``, c2p/p2c from per-token ``[heads, T, R]`` score tables computed by one batched product
before the launch. No padded or ``S x S`` bias exists.

Rotary positions (``rotary=(cos, sin)``, ``[T, d/2]`` fp32 tables; ModernBERT, NomicBERT, EuroBERT): Q and K
are rotated as they are loaded (``_load_rotated``), pairs ``(x[m], x[m + d/2])`` ("rotate half"), in fp32
after the bias, rounded once to the dtype; they stay as two halves and the logits are ``q1 . k1 + q2 . k2``
(two products of depth d/2), so each element and each table entry is loaded once. With rotary the K bias no
longer cancels (``q . R_j b_k`` depends on the key), so it is added to K before the rotation. A sliding window
(``window=w``: ``|i - j| <= w``, ModernBERT's local layers) limits each query block's key loop to the blocks
that meet ``[m_lo - w, m_hi + w]``, so a local layer costs ``O(T w)``; the band is masked inside those tiles.
Each is a constexpr variant of the one kernel.

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
from .relative import RelativeScores, token_score_tables

HEAD_DIMS = (16, 32, 64, 80, 96, 128)
LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels may read only constexpr globals
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
def _relative_terms(offs_m, cols, seqlen, max_seqlen, row0, head, index_ptr, bias_ptr, c2p_ptr, p2c_ptr, R,
                    stride_rel_head, HAS_REL_BIAS: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr):
    """The relative-position terms of one ``[BLOCK_M, BLOCK_N]`` tile, fp32, in natural-log units (already
    scaled): ``c2p[q_i, r] + p2c[k_j, r] + bias[r]`` with ``r = index[i - j + max_seqlen - 1]``. Each is a
    gather from a small table (``[heads, R]`` or ``[heads, T, R]``); pairs outside the sequence read zero."""
    valid = (offs_m[:, None] < seqlen) & (cols[None, :] < seqlen)
    r = tl.load(index_ptr + (offs_m[:, None] - cols[None, :] + (max_seqlen - 1)), mask=valid, other=0)
    extra = tl.zeros(r.shape, tl.float32)
    head_off = head.to(tl.int64) * stride_rel_head
    if HAS_C2P:  # indexed by the query's row
        extra += tl.load(c2p_ptr + head_off + (row0 + offs_m)[:, None] * R + r, mask=valid, other=0.0).to(tl.float32)
    if HAS_P2C:  # indexed by the key's row
        extra += tl.load(p2c_ptr + head_off + (row0 + cols)[None, :] * R + r, mask=valid, other=0.0).to(tl.float32)
    if HAS_REL_BIAS:
        extra += tl.load(bias_ptr + head * R + r, mask=valid, other=0.0).to(tl.float32)
    return extra


@triton.jit
def _load_head(base, rows, row_ok, offs_d, stride_row, bias_ptr, HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One head's ``[len(rows), BLOCK_D]`` tile of Q (``base``: its column 0 of the sequence's row 0) with its bias
    (``bias_ptr``: the head's slice) added in fp32, rounded once to the tile's dtype."""
    d_ok = offs_d < HEAD_DIM
    x = tl.load(base + rows[:, None] * stride_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_BIAS:
        x = (x.to(tl.float32) + tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
    return x


@triton.jit
def _load_rotated(base, rows, row_ok, stride_row, bias_ptr, cos_ptr, sin_ptr, stride_rot, row0,
                  HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One head's Q or K tile rotated, as its two halves ``(x[:d/2], x[d/2:])``, each ``[len(rows), BLOCK_H]``:
    the bias added, then each pair ``(x1, x2) = (x[m], x[m + d/2])`` turned by its token's angle (``cos``/``sin``
    ``[T, d/2]`` fp32, rows ``row0 + rows``) to ``(x1 cos - x2 sin, x2 cos + x1 sin)``, in fp32, rounded once to
    the dtype. Kept as halves (the scores are ``q1 . k1 + q2 . k2``), each element is loaded once and each table
    entry once, for both halves."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < HALF
    mask = row_ok[:, None] & h_ok[None, :]
    ptrs = base + rows[:, None] * stride_row + offs_h[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    y1 = x1.to(tl.float32)
    y2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y1 += tl.load(bias_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
        y2 += tl.load(bias_ptr + HALF + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    rot = (row0 + rows)[:, None] * stride_rot + offs_h[None, :]
    c = tl.load(cos_ptr + rot, mask=mask, other=0.0)
    sn = tl.load(sin_ptr + rot, mask=mask, other=0.0)
    return (y1 * c - y2 * sn).to(x1.dtype), (y2 * c + y1 * sn).to(x1.dtype)


@triton.jit
def _attn_kv_block(acc, l_i, m_i, q, q2, k_base, v_base, start_n, offs_m, offs_n, offs_d, seqlen, stride_row,
                   qk_scale, max_seqlen, row0, head, index_ptr, rel_bias_ptr, c2p_ptr, p2c_ptr, R, stride_rel_head,
                   kbias_ptr, cos_ptr, sin_ptr, stride_rot, window,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, MASK_N: tl.constexpr,
                   HAS_REL_BIAS: tl.constexpr, HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ROTARY: tl.constexpr, WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One step of the online softmax over keys ``start_n + offs_n``; returns the updated (acc, l_i, m_i).
    ``ROTARY``: ``q``, ``q2`` are Q's rotated halves and K gets its bias and rotation as it is loaded;
    ``WINDOW``: keys with ``|i - j| > window`` are masked (a tile may then hold no key of some query row: the
    running max stays finite-safe)."""
    cols = start_n + offs_n  # [BLOCK_N] key positions inside the sequence
    ptr_off = cols[:, None] * stride_row + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASK_N:
        if BLOCK_D != HEAD_DIM:
            mask = (cols[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        else:
            mask = cols[:, None] < seqlen
        v = tl.load(v_base + ptr_off, mask=mask, other=0.0)
        if not ROTARY:
            k = tl.load(k_base + ptr_off, mask=mask, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            mask = offs_d[None, :] < HEAD_DIM
            v = tl.load(v_base + ptr_off, mask=mask, other=0.0)
            if not ROTARY:
                k = tl.load(k_base + ptr_off, mask=mask, other=0.0)
        else:
            v = tl.load(v_base + ptr_off)
            if not ROTARY:
                k = tl.load(k_base + ptr_off)
    if ROTARY:  # the K bias is added, then rotated (the bias-skipping identity holds only without rotation)
        k1, k2 = _load_rotated(k_base, cols, cols < seqlen, stride_row, kbias_ptr, cos_ptr, sin_ptr, stride_rot,
                               row0, HEAD_DIM, BLOCK_H, HAS_BIAS)
        s = _mma(q2, tl.trans(k2), _mma(q, tl.trans(k1), None, PRECISION, INTERPRET), PRECISION, INTERPRET)
        s = s * qk_scale
    else:
        s = _mma(q, tl.trans(k), None, PRECISION, INTERPRET) * qk_scale  # [BLOCK_M, BLOCK_N] logits, log2 units
    if HAS_REL_BIAS or HAS_C2P or HAS_P2C:
        s += _relative_terms(offs_m, cols, seqlen, max_seqlen, row0, head, index_ptr, rel_bias_ptr, c2p_ptr,
                             p2c_ptr, R, stride_rel_head, HAS_REL_BIAS, HAS_C2P, HAS_P2C) * _LOG2E
    if WINDOW:
        dist = offs_m[:, None] - cols[None, :]
        s = tl.where((cols[None, :] < seqlen) & (dist <= window) & (dist >= -window), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: exp2(-inf - 0) = 0, no NaN
    else:
        if MASK_N:
            s = tl.where(cols[None, :] < seqlen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # running max, in log2 units
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)  # rescale of what was accumulated so far
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _mma(p.to(v.dtype), v, acc, PRECISION, INTERPRET)
    return acc, l_i, m_new


@triton.jit
def _varlen_attention_kernel(qkv_ptr, bias_ptr, out_ptr, cu_seqlens_ptr, stride_row, stride_out, qk_scale,
                             max_seqlen, index_ptr, rel_bias_ptr, c2p_ptr, p2c_ptr, R, stride_rel_head,
                             cos_ptr, sin_ptr, stride_rot, window,
                             NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             SINGLE_TILE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
                             HAS_C2P: tl.constexpr, HAS_P2C: tl.constexpr, ROTARY: tl.constexpr, WINDOW: tl.constexpr,
                             PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
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
    kbias_ptr = bias_ptr + hidden + head * HEAD_DIM

    if BLOCK_D != HEAD_DIM:
        q_mask = (offs_m[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    else:
        q_mask = offs_m[:, None] < seqlen
    # Q with its bias (rotary: and its rotation, as two halves), rounded once to qkv's dtype
    if ROTARY:
        q, q2 = _load_rotated(q_base, offs_m, offs_m < seqlen, stride_row, bias_ptr + head * HEAD_DIM, cos_ptr,
                              sin_ptr, stride_rot, row0, HEAD_DIM, BLOCK_H, HAS_BIAS)
    else:
        q = _load_head(q_base, offs_m, offs_m < seqlen, offs_d, stride_row, bias_ptr + head * HEAD_DIM, HEAD_DIM,
                       HAS_BIAS)
        q2 = q  # unused

    if SINGLE_TILE:
        # the whole sequence's keys in one tile: plain softmax, no running rescale
        ptr_off = offs_n[:, None] * stride_row + offs_d[None, :]
        if BLOCK_D != HEAD_DIM:
            kv_mask = (offs_n[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
        else:
            kv_mask = offs_n[:, None] < seqlen
        if ROTARY:
            k1, k2 = _load_rotated(k_base, offs_n, offs_n < seqlen, stride_row, kbias_ptr, cos_ptr, sin_ptr,
                                   stride_rot, row0, HEAD_DIM, BLOCK_H, HAS_BIAS)
            s = _mma(q2, tl.trans(k2), _mma(q, tl.trans(k1), None, PRECISION, INTERPRET), PRECISION, INTERPRET)
            s = s * qk_scale
        else:
            k = tl.load(k_base + ptr_off, mask=kv_mask, other=0.0)
            s = _mma(q, tl.trans(k), None, PRECISION, INTERPRET) * qk_scale
        v = tl.load(v_base + ptr_off, mask=kv_mask, other=0.0)
        if HAS_REL_BIAS or HAS_C2P or HAS_P2C:
            s += _relative_terms(offs_m, offs_n, seqlen, max_seqlen, row0, head, index_ptr, rel_bias_ptr,
                                 c2p_ptr, p2c_ptr, R, stride_rel_head, HAS_REL_BIAS, HAS_C2P, HAS_P2C) * _LOG2E
        if WINDOW:
            dist = offs_m[:, None] - offs_n[None, :]
            s = tl.where((offs_n[None, :] < seqlen) & (dist <= window) & (dist >= -window), s, float("-inf"))
            m_i = tl.max(s, 1)
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows past the sequence may see no key
        else:
            s = tl.where(offs_n[None, :] < seqlen, s, float("-inf"))
            m_i = tl.max(s, 1)
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, None, PRECISION, INTERPRET)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if WINDOW:  # only the key blocks that meet [m_lo - window, m_hi + window]: O(window) per query block
            lo_n = (tl.maximum(pid_m * BLOCK_M - window, 0) // BLOCK_N) * BLOCK_N
            hi_n = tl.minimum(seqlen, pid_m * BLOCK_M + BLOCK_M + window)  # masked per key (band and bounds)
        else:
            lo_n = 0
            hi_n = (seqlen // BLOCK_N) * BLOCK_N  # keys [0, hi_n) need no bounds mask; the tail comes after
        if INTERPRET:  # Triton's CPU interpreter cannot take a tensor as range() bound under numpy >= 2.4
            start_n = lo_n
            while start_n < hi_n:
                acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, q2, k_base, v_base, start_n, offs_m, offs_n,
                                               offs_d, seqlen, stride_row, qk_scale, max_seqlen, row0, head,
                                               index_ptr, rel_bias_ptr, c2p_ptr, p2c_ptr, R, stride_rel_head,
                                               kbias_ptr, cos_ptr, sin_ptr, stride_rot, window, HEAD_DIM,
                                               BLOCK_D, BLOCK_H, WINDOW, HAS_REL_BIAS, HAS_C2P, HAS_P2C, HAS_BIAS,
                                               ROTARY, WINDOW, PRECISION, INTERPRET)
                start_n += BLOCK_N
        else:
            for start_n in range(lo_n, hi_n, BLOCK_N):
                acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, q2, k_base, v_base, start_n, offs_m, offs_n,
                                               offs_d, seqlen, stride_row, qk_scale, max_seqlen, row0, head,
                                               index_ptr, rel_bias_ptr, c2p_ptr, p2c_ptr, R, stride_rel_head,
                                               kbias_ptr, cos_ptr, sin_ptr, stride_rot, window, HEAD_DIM,
                                               BLOCK_D, BLOCK_H, WINDOW, HAS_REL_BIAS, HAS_C2P, HAS_P2C, HAS_BIAS,
                                               ROTARY, WINDOW, PRECISION, INTERPRET)
        if not WINDOW:
            if hi_n < seqlen:  # the last, partial block of keys, bounds-masked
                acc, l_i, m_i = _attn_kv_block(acc, l_i, m_i, q, q2, k_base, v_base, hi_n, offs_m, offs_n, offs_d,
                                               seqlen, stride_row, qk_scale, max_seqlen, row0, head, index_ptr,
                                               rel_bias_ptr, c2p_ptr, p2c_ptr, R, stride_rel_head, kbias_ptr,
                                               cos_ptr, sin_ptr, stride_rot, window, HEAD_DIM, BLOCK_D, BLOCK_H, True,
                                               HAS_REL_BIAS, HAS_C2P, HAS_P2C, HAS_BIAS, ROTARY, False,
                                               PRECISION, INTERPRET)

    if WINDOW:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the sequence's end (not stored) may have seen no key
    acc = acc / l_i[:, None]
    if HAS_BIAS:
        bv = tl.load(bias_ptr + 2 * hidden + head * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
        acc = acc + bv.to(tl.float32)[None, :]
    o_ptrs = out_ptr + row0 * stride_out + head * HEAD_DIM + offs_m[:, None] * stride_out + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
# Launch configurations: the single-tile path up to 64 tokens, then 64x64 tiles, 4 warps, 3 stages (chosen on an
# H100 with benchmarks/gpu_kernels.py --tune: benchmarks/NOTES.md section 23)
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


def launch_varlen_attention(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias=None, scale=None, rel=None, *,
                            block_m, block_n, single_tile, num_warps, num_stages, rotary=None, window=None):
    """Launch the kernel with explicit block sizes (tests and benchmarks; :func:`varlen_attention` picks them)."""
    head_dim = _check(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias)
    rotary, window = _check_rotary_window(qkv, head_dim, rel, rotary, window)
    return _launch(qkv, cu_seqlens, int(max_seqlen), num_heads, head_dim, qkv_bias, scale, rel, block_m, block_n,
                   single_tile, num_warps, num_stages, rotary, window)


def _check_rotary_window(qkv, head_dim, rel, rotary, window):
    """``rotary`` as two contiguous fp32 ``[T, d/2]`` tables (or None) and ``window`` as an int (or None)."""
    if window is not None:
        if rel is not None:
            raise ValueError("a sliding window with relative-position terms is not supported")
        if isinstance(window, torch.Tensor) or not isinstance(window, numbers.Integral) or window < 0:
            raise ValueError(f"window must be a host int >= 0; got {window!r}")
        window = int(window)
    if rotary is not None:
        cos, sin = rotary
        want = (qkv.shape[0], head_dim // 2)
        for name, t in (("cos", cos), ("sin", sin)):
            if tuple(t.shape) != want or t.device != qkv.device:
                raise ValueError(f"rotary {name} must be [T, head_dim / 2] = {want} on {qkv.device}; got "
                                 f"{tuple(t.shape)} on {t.device}")
        rotary = tuple(t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
                       for t in (cos, sin))
    return rotary, window


def _relative_tables(qkv, qkv_bias, rel: RelativeScores, max_seqlen, num_heads, head_dim, scale):
    """The kernel's view of ``rel``, checked: ``(index, bias [heads, R], c2p [heads, T, R], p2c [heads, T, R], R)``.

    DeBERTa's content-to-position term ``q_i . pos_key[r]`` takes every row r of a query's reach, so it is one
    batched product per token (:func:`padfree.ops.relative.token_score_tables`); the kernel gathers its entry
    per (i, j) inside the tile. Likewise position-to-content from the keys."""
    if rel.index.shape != (2 * max_seqlen - 1,) or rel.index.dtype not in (torch.int32, torch.int64) \
            or rel.index.device != qkv.device:
        raise ValueError(f"rel.index must be a [2 * max_seqlen - 1] = [{2 * max_seqlen - 1}] integer tensor on "
                         f"{qkv.device}; got {rel.index.dtype} {tuple(rel.index.shape)} on {rel.index.device}")
    tables = {name: t for name, t in (("bias", rel.bias), ("pos_key", rel.pos_key), ("pos_query", rel.pos_query))
              if t is not None}
    R = rel.bias.shape[-1] if rel.bias is not None else next(iter(tables.values())).shape[1]
    for name, t in tables.items():
        want = (num_heads, R) if name == "bias" else (num_heads, R, head_dim)
        if tuple(t.shape) != want or t.device != qkv.device:
            raise ValueError(f"rel.{name} must be [heads, R{'' if name == 'bias' else ', head_dim'}] = {want} "
                             f"on {qkv.device} (every table has the same R rows); got {tuple(t.shape)} on {t.device}")

    bias = None if rel.bias is None else rel.bias.contiguous()
    c2p, p2c = token_score_tables(qkv, qkv_bias, rel, num_heads, head_dim, scale)
    return rel.index.contiguous(), bias, c2p, p2c, R


def _launch(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, qkv_bias, scale, rel, block_m, block_n, single_tile,
            num_warps, num_stages, rotary=None, window=None):
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
    index = rel_bias = c2p = p2c = None
    R = 1
    if rel is not None and (rel.bias is not None or rel.pos_key is not None or rel.pos_query is not None):
        index, rel_bias, c2p, p2c, R = _relative_tables(qkv, qkv_bias, rel, max_seqlen, num_heads, head_dim, scale)
    cos, sin = (None, None) if rotary is None else rotary
    # a window reaching the whole sequence masks nothing: the plain kernel then does the same work
    windowed = window is not None and window < max_seqlen - 1
    grid = (triton.cdiv(max_seqlen, block_m), batch, num_heads)
    _varlen_attention_kernel[grid](
        qkv, _or(qkv_bias, qkv), out, cu_seqlens, qkv.stride(0), out.stride(0), scale * LOG2E, max_seqlen,
        _or(index, cu_seqlens), _or(rel_bias, qkv), _or(c2p, qkv), _or(p2c, qkv), R, T * R,
        _or(cos, qkv), _or(sin, qkv), head_dim // 2, window if windowed else 0,
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_H=max(16, triton.next_power_of_2(head_dim // 2)),
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_TILE=single_tile, HAS_BIAS=qkv_bias is not None,
        HAS_REL_BIAS=rel_bias is not None, HAS_C2P=c2p is not None, HAS_P2C=p2c is not None,
        ROTARY=rotary is not None, WINDOW=windowed,
        PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", INTERPRET=_interpreting(),
        num_warps=num_warps, num_stages=num_stages)
    return out


def _or(t, placeholder):
    """``t``, or a placeholder pointer for an argument the kernel's constexpr flags make it never read."""
    return placeholder if t is None else t


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------
def varlen_attention(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                     qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                     rel: RelativeScores | None = None, runs=None,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None
                     ) -> torch.Tensor:
    """See :func:`padfree.ops.reference.varlen_attention_ref`. ``[T, 3H]`` -> ``[T, H]``; no host sync.

    ``rel``: relative-position score terms (MPNet's bias, DeBERTa's c2p/p2c), gathered inside the tile loop.
    ``rotary``: ``(cos, sin)`` ``[T, d/2]`` fp32 (:func:`padfree.ops.rotary.rotary_tables`): Q and K are rotated
    as they are loaded. ``window``: query i sees keys ``|i - j| <= window`` only; each query block visits only the
    key blocks its band meets (not combined with ``rel``).
    ``runs`` (the host's runs of equal lengths) is not needed: the kernel reads the offsets on the device."""
    head_dim = _check(qkv, cu_seqlens, max_seqlen, num_heads, qkv_bias)
    rotary, window = _check_rotary_window(qkv, head_dim, rel, rotary, window)
    max_seqlen = int(max_seqlen)
    cfg = attention_config(max_seqlen, head_dim, qkv.dtype)
    return _launch(qkv, cu_seqlens, max_seqlen, num_heads, head_dim, qkv_bias, scale, rel, **cfg, rotary=rotary,
                   window=window)
