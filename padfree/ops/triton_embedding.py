"""``LayerNorm(word[ids] + position[pos] + token_type[types])`` in Triton: gather, sum and normalise in one pass.

Each program handles ``ROWS`` tokens: it loads their ids, gathers one row of each table per token (the tables
stay wherever they are; nothing is materialised), sums in fp32 and applies LayerNorm with fp32 statistics.
The position and token-type tables are optional (families without them pass None), and so is the LayerNorm bias
(ModernBERT has none).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import embed_layer_norm_ref  # noqa: F401  (the definition of this op)
from .triton_layer_norm import MAX_HIDDEN, _layer_norm_store, row_config

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _embed_layer_norm_kernel(ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr, w_ptr, b_ptr,
                             out_ptr, n_rows, n_cols, stride_word, stride_pos, stride_type, stride_out, eps,
                             HAS_POS: tl.constexpr, HAS_TYPE: tl.constexpr, HAS_LN_BIAS: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] token indices
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    ids = tl.load(ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    y = tl.load(word_ptr + ids[:, None] * stride_word + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        y += tl.load(pos_ptr + pos[:, None] * stride_pos + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPE:
        typ = tl.load(type_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        y += tl.load(type_ptr + typ[:, None] * stride_type + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rows64 = rows.to(tl.int64)[:, None]
    _layer_norm_store(y, mask, cols, col_ok, n_cols, eps, w_ptr, b_ptr, out_ptr + rows64 * stride_out, HAS_LN_BIAS)


# ----------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------
def _check_ids(name, ids, T, device):
    if ids is None:
        raise ValueError(f"{name} is required when its table is given")
    if ids.shape != (T,) or ids.dtype not in _ID_DTYPES or ids.device != device:
        raise ValueError(f"{name} must be int32/int64 [{T}] on {device}; got {ids.dtype} {tuple(ids.shape)} "
                         f"on {ids.device}")


def launch_embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
                            eps):
    if word.dim() != 2 or word.dtype not in _DTYPES:
        raise ValueError(f"word table must be [rows, E] in {[str(d) for d in _DTYPES]}; got {word.dtype} "
                         f"{tuple(word.shape)}")
    E = word.shape[1]
    if E > MAX_HIDDEN:
        raise ValueError(f"embedding size {E} > {MAX_HIDDEN} not supported by the Triton embedding")
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [T]; got {tuple(input_ids.shape)}")
    T = input_ids.shape[0]
    _check_ids("input_ids", input_ids, T, word.device)
    for name, table, ids in (("position", position, position_ids), ("token_type", token_type, token_type_ids)):
        if table is None:
            continue
        if table.dim() != 2 or table.shape[1] != E or table.dtype != word.dtype or table.device != word.device:
            raise ValueError(f"{name} table must be [rows, {E}] {word.dtype} on {word.device}; got "
                             f"{table.dtype} {tuple(table.shape)} on {table.device}")
        _check_ids(f"{name}_ids", ids, T, word.device)
    for name, t in (("weight", weight), ("bias", bias)):
        if name == "bias" and t is None:  # a LayerNorm without bias (ModernBERT)
            continue
        if t is None or t.shape != (E,) or not t.is_contiguous() or t.device != word.device:
            raise ValueError(f"{name} must be a contiguous [{E}] on {word.device}")
    tables = [t if t is None or t.stride(1) == 1 else t.contiguous() for t in (word, position, token_type)]
    word, position, token_type = tables
    input_ids = input_ids.contiguous()
    position_ids = None if position is None else position_ids.contiguous()
    token_type_ids = None if token_type is None else token_type_ids.contiguous()
    out = torch.empty(T, E, dtype=word.dtype, device=word.device)
    if T == 0:
        return out
    block, rows, num_warps = row_config(E, word.element_size())
    _embed_layer_norm_kernel[(triton.cdiv(T, rows),)](
        input_ids, input_ids if position is None else position_ids,
        input_ids if token_type is None else token_type_ids,
        word, word if position is None else position, word if token_type is None else token_type,
        weight, weight if bias is None else bias, out, T, E, word.stride(0),
        0 if position is None else position.stride(0), 0 if token_type is None else token_type.stride(0),
        out.stride(0), float(eps), HAS_POS=position is not None, HAS_TYPE=token_type is not None,
        HAS_LN_BIAS=bias is not None, ROWS=rows, BLOCK=block, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------------------------------------
# public function
# ----------------------------------------------------------------------------------------------------------
def embed_layer_norm(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                     token_type_ids: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor | None,
                     token_type: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """See :func:`padfree.ops.reference.embed_layer_norm_ref`: ``[T, E]`` in the word table's dtype; ``bias=None``:
    a LayerNorm without bias."""
    return launch_embed_layer_norm(input_ids, position_ids, token_type_ids, word, position, token_type, weight,
                                   bias, eps)
