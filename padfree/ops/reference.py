"""Pure-PyTorch references of padfree's ops: plain, per-sequence, fp32 math.

These define what every backend must compute; tests compare backends against them. They favour clarity
over speed (a Python loop over sequences for attention) and are not used on the hot path.
Shapes: T = packed tokens, H = hidden size, F = FFN size, B = sequences.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .relative import RelativeScores, relative_score_terms


def varlen_attention_ref(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                         qkv_bias: torch.Tensor | None = None, scale: float | None = None,
                         rel: RelativeScores | None = None, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                         window: int | None = None) -> torch.Tensor:
    """Multi-head self-attention inside each sequence of a packed batch.

    qkv: ``[T, 3*H]`` (Q | K | V, each ``[heads, head_dim]``); qkv_bias: ``[3*H]`` added before attention;
    rel: optional relative-position score terms (see :class:`padfree.ops.relative.RelativeScores`), taken
    within each sequence; rotary: ``(cos, sin)`` tables ``[T, d/2]`` rotating Q and K (see :func:`rotary_ref`);
    window: query i sees only the keys j of its sequence with ``|i - j| <= window`` (None = all);
    returns the context ``[T, H]`` in qkv's dtype, computed in fp32.
    """
    T, three_h = qkv.shape
    H = three_h // 3
    d = H // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    x = qkv.float() + (0 if qkv_bias is None else qkv_bias.float())
    if rotary is not None:
        x = _rotate(x.view(T, 3, num_heads, d), *rotary)
    x = x.view(T, 3, num_heads, d)
    out = torch.empty(T, num_heads, d, dtype=torch.float32, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end, i].transpose(0, 1) for i in range(3))  # each [heads, L, d]
        s = (q @ k.transpose(1, 2)) * scale  # [heads, L, L]
        if rel is not None:
            s = s + relative_score_terms(q[None], k[None], rel, max_seqlen, scale)[0]
        if window is not None:
            pos = torch.arange(end - start, device=qkv.device)
            s = s.masked_fill((pos[:, None] - pos[None, :]).abs() > window, float("-inf"))
        p = torch.softmax(s, dim=-1)  # [heads, L, L]
        out[start:end] = (p @ v).transpose(0, 1)  # [L, heads, d]
    return out.reshape(T, H).to(qkv.dtype)


def add_bias_residual_layer_norm_ref(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                                     weight: torch.Tensor, ln_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x + bias + residual)`` over the last dim, fp32 statistics; ``[T, H]`` in x's dtype."""
    y = x.float() + residual.float() + (0 if bias is None else bias.float())
    return F.layer_norm(y, y.shape[-1:], weight.float(), _f32(ln_bias), eps).to(x.dtype)


def bias_act_ref(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(x + bias)`` in fp32; ``[T, F]`` in x's dtype."""
    y = x.float() + (0 if bias is None else bias.float())
    return apply_activation(y, activation).to(x.dtype)


def embed_layer_norm_ref(input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                         token_type_ids: torch.Tensor | None, word: torch.Tensor, position: torch.Tensor | None,
                         token_type: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """``LayerNorm(word[ids] + position[pos] + token_type[types])``; tables ``[rows, E]``; returns ``[T, E]``.

    ``position``/``token_type`` may be None for families without them.
    """
    y = word[input_ids].float()
    if position is not None:
        y = y + position[position_ids].float()
    if token_type is not None:
        y = y + token_type[token_type_ids].float()
    return F.layer_norm(y, y.shape[-1:], weight.float(), _f32(bias), eps).to(word.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, 3, heads, d]`` fp32 with Q and K rotated: pair m of a head is the complex number
    ``x[m] + i x[m + d/2]``, multiplied by ``cos + i sin`` of its token's angle m."""
    half = x.shape[-1] // 2
    z = torch.complex(x[:, :2, :, :half], x[:, :2, :, half:]) * torch.complex(cos, sin)[:, None, None, :]
    return torch.cat((torch.cat((z.real, z.imag), dim=-1), x[:, 2:]), dim=1)


def rotary_ref(qkv: torch.Tensor, positions: torch.Tensor, num_heads: int, theta: float) -> torch.Tensor:
    """RoPE on packed Q and K from first principles (fp64 angles ``p * theta ** (-2m / d)``, complex rotation of
    the pairs ``(x[m], x[m + d/2])``): ``qkv [T, 3H]`` -> ``[T, 3H]`` in qkv's dtype, V unchanged."""
    T = qkv.shape[0]
    d = qkv.shape[1] // 3 // num_heads
    m = torch.arange(d // 2, dtype=torch.float64, device=qkv.device)
    angles = positions.double()[:, None] * theta ** (-2 * m / d)[None, :]  # [T, d/2]
    x = _rotate(qkv.float().view(T, 3, num_heads, d), angles.cos().float(), angles.sin().float())
    return x.reshape(T, -1).to(qkv.dtype)


def gated_act_ref(x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Gated activation (GeGLU with GELU): ``y = x + bias`` is ``[input | gate]`` (``[T, 2F]``);
    returns ``act(input) * gate`` ``[T, F]`` in x's dtype, computed in fp32."""
    y = x.float() + (0 if bias is None else bias.float())
    f = y.shape[-1] // 2
    return (apply_activation(y[:, :f], activation) * y[:, f:]).to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: ``x / sqrt(mean(x^2) + eps) * weight`` in fp32 (no mean subtracted, no bias);
    ``[T, H]`` in x's dtype."""
    y = x.float()
    return (y / (y.square().mean(dim=-1, keepdim=True) + eps).sqrt() * weight.float()).to(x.dtype)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()  # a LayerNorm without bias (ModernBERT) passes None
