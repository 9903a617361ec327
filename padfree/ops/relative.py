"""Relative-position score terms for ``varlen_attention``: the op-interface type and their plain math.

Some families add to the attention scores terms that depend on the distance between a query and a key of
the same sequence (MPNet: a bucketed bias; DeBERTa: content-to-position and position-to-content products).
They are passed to ``varlen_attention`` as one :class:`RelativeScores` of small tables, never as a
``[B, heads, S, S]`` padded bias: a kernel can look the terms up inside its tile loop from ``(i - j)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RelativeScores:
    """Additive attention-score terms indexed by the distance between query i and key j of one sequence.

    With ``r = index[i - j + max_seqlen - 1]`` (i, j positions inside their own sequence), head h scores

        ``s[h, i, j] = scale * (q_i.k_j + q_i.pos_key[h, r] + k_j.pos_query[h, r]) + bias[h, r]``

    where q and k already include the QKV bias and absent terms are zero. R is the number of table rows the
    batch can reach (the model slices its tables to them).
    """
    index: torch.Tensor
    """``[2 * max_seqlen - 1]`` int64: table row for the distance ``i - j`` (offset by ``max_seqlen - 1``)."""
    bias: torch.Tensor | None = None
    """``[heads, R]``: added to the scaled scores (MPNet's relative attention bias)."""
    pos_key: torch.Tensor | None = None
    """``[heads, R, d]``: content-to-position keys, multiplied with the query (DeBERTa c2p)."""
    pos_query: torch.Tensor | None = None
    """``[heads, R, d]``: position-to-content queries, multiplied with the key (DeBERTa p2c)."""

    def distance_rows(self, length: int, max_seqlen: int) -> torch.Tensor:
        """``[L, L]`` int64 table rows for the query/key pairs of one sequence of ``length`` tokens."""
        pos = torch.arange(length, device=self.index.device)
        return self.index[pos[:, None] - pos[None, :] + (max_seqlen - 1)]


def relative_score_terms(q: torch.Tensor, k: torch.Tensor, rel: RelativeScores, max_seqlen: int,
                         scale: float) -> torch.Tensor:
    """The additive terms for ``g`` sequences of equal length L: ``q, k [g, heads, L, d]`` -> ``[g, heads, L, L]``
    in fp32 (added to ``scale * q.k`` before the softmax)."""
    g, heads, L, _ = q.shape
    rows = rel.distance_rows(L, max_seqlen)  # [L, L]
    out = torch.zeros(g, heads, L, L, dtype=torch.float32, device=q.device)
    if rel.pos_key is not None:  # c2p[i, j] = q_i . pos_key[rows[i, j]]
        c2p = q.float() @ rel.pos_key.float().transpose(-1, -2).unsqueeze(0)  # [g, heads, L, R]
        out += scale * torch.gather(c2p, -1, rows.expand(g, heads, L, L))
    if rel.pos_query is not None:  # p2c[i, j] = k_j . pos_query[rows[i, j]]
        p2c = k.float() @ rel.pos_query.float().transpose(-1, -2).unsqueeze(0)  # [g, heads, L(j), R]
        out += scale * torch.gather(p2c, -1, rows.t().expand(g, heads, L, L)).transpose(-1, -2)
    if rel.bias is not None:
        out += rel.bias.float()[:, rows].unsqueeze(0)  # [1, heads, L, L]
    return out
