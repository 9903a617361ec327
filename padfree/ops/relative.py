"""Relative-position attention, all of it: the distance buckets of each family, the per-batch tables, the
op-interface type and the plain math of the score terms.

Some families add to the attention scores terms that depend on the distance between a query and a key of
the same sequence:

- MPNet: a ``[buckets, heads]`` bias table shared by all layers, indexed by T5-style log buckets of ``j - i``.
- DeBERTa-v2/v3: disentangled attention. A relative embedding table (optionally LayerNorm-ed) is projected by
  each layer into position keys (content-to-position, c2p) and position queries (position-to-content, p2c),
  indexed by DeBERTa's log buckets of ``i - j``.

Distances are taken inside each sequence of the packed batch (``i``, ``j`` restart at 0 per sequence), so
one ``[2 * max_seqlen - 1]`` index serves the whole batch; tables are sliced to the rows it can reach. They
reach ``varlen_attention`` as one :class:`RelativeScores` of small tables, never as a ``[B, heads, S, S]``
padded bias: a kernel can look the terms up inside its tile loop from ``(i - j)``. The model side
(:class:`RelativeTables`: buckets, rows, per-layer projections) and the op side (:func:`relative_score_terms`
for the CPU attention and the reference, :func:`token_score_tables` for the Triton kernel) live here together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig


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


def token_score_tables(qkv: torch.Tensor, qkv_bias: torch.Tensor | None, rel: RelativeScores, num_heads: int,
                       head_dim: int, scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """DeBERTa's terms per token and table row, for a kernel that gathers them per (i, j): ``(c2p, p2c)``, each
    ``[heads, T, R]`` (scaled) or None. ``c2p[h, t, r] = scale * q_t . pos_key[h, r]`` (the query of token t),
    ``p2c[h, t, r] = scale * k_t . pos_query[h, r]`` (its key); ``qkv [T, 3H]`` without its bias. Linear in T
    and bounded by the rows R the batch reaches, never ``S x S``."""
    hidden = num_heads * head_dim

    def scores(part, table):  # scale * (x + b) . table[r] for every token and row: [heads, T, R]
        x = qkv[:, part * hidden:(part + 1) * hidden]
        if qkv_bias is not None:
            x = x + qkv_bias[part * hidden:(part + 1) * hidden]
        x = x.reshape(-1, num_heads, head_dim).transpose(0, 1)  # [heads, T, d]
        return torch.matmul(x, table.to(qkv.dtype).transpose(1, 2)).mul_(scale).contiguous()

    return (None if rel.pos_key is None else scores(0, rel.pos_key),
            None if rel.pos_query is None else scores(1, rel.pos_query))


# ---------------------------------------------------------------------------------------------- model side
def mpnet_bucket(distance: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """MPNet's (T5's bidirectional) bucket of ``distance = i - j`` (HF computes it from ``j - i``)."""
    n = distance  # HF: n = -(j - i)
    half = num_buckets // 2
    ret = (n < 0).long() * half
    n = n.abs()
    max_exact = half // 2
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return ret + torch.where(n < max_exact, n, large)


def deberta_bucket(distance: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa's log bucket of ``distance = i - j`` (exact below ``bucket_size // 2``, logarithmic after)."""
    sign = torch.sign(distance)
    mid = bucket_size // 2
    abs_pos = torch.where((distance < mid) & (distance > -mid), torch.tensor(mid - 1).type_as(distance),
                          distance.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, distance.type_as(log_pos), log_pos * sign).long()


def relative_rows(cfg: ModelConfig, max_seqlen: int, device) -> torch.Tensor:
    """``[2 * max_seqlen - 1]`` int64: the table row of each distance ``i - j`` in ``[-(L-1), L-1]``."""
    distance = torch.arange(-(max_seqlen - 1), max_seqlen, device=device)
    if cfg.relative_attention == "bias":
        return mpnet_bucket(distance, cfg.relative_buckets, cfg.max_relative_positions)
    span = deberta_span(cfg)
    if cfg.relative_buckets > 0 and cfg.max_relative_positions > 0:
        distance = deberta_bucket(distance, cfg.relative_buckets, cfg.max_relative_positions)
    return torch.clamp(distance + span, 0, 2 * span - 1)


def device_rows(cfg: ModelConfig, max_seqlen: int, device) -> tuple[torch.Tensor, int, int]:
    """``(index on device, lo, hi)``: :func:`relative_rows` shifted to start at its smallest row ``lo``, so that
    tables sliced to ``[lo, hi]`` hold only the rows a batch of ``max_seqlen`` can reach. Computed on the host
    (no device sync)."""
    rows = relative_rows(cfg, max_seqlen, "cpu")
    lo, hi = int(rows.min()), int(rows.max())
    return (rows - lo).to(device), lo, hi


def deberta_span(cfg: ModelConfig) -> int:
    """DeBERTa's attention span: the relative table has ``2 * span`` rows."""
    return cfg.relative_buckets if cfg.relative_buckets > 0 else cfg.max_relative_positions


class RelativeTables:
    """Per-batch relative-position state: the distance index and the table rows it reaches.

    Built once per forward pass (shared by every layer); :meth:`scores` gives each layer its terms. ``rows``:
    the host-computed :func:`relative_rows` already on the table's device (see RelativePositions.for_batch).
    """

    def __init__(self, cfg: ModelConfig, table: torch.Tensor, norm: tuple | None, rows: tuple[torch.Tensor, int, int]):
        index, lo, hi = rows
        self.cfg = cfg
        self.index = index  # rows of the sliced tables, on the device
        used = table[lo:hi + 1]  # [R, heads] (MPNet) or [R, H] (DeBERTa)
        if norm is not None:  # DeBERTa norm_rel_ebd: LayerNorm each row of the embedding table
            used = F.layer_norm(used.float(), used.shape[-1:], norm[0].float(), norm[1].float(),
                                cfg.layer_norm_eps).to(used.dtype)
        self.table = used

    def scores(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, pos_key=None, pos_query=None
               ) -> RelativeScores:
        """The layer's :class:`RelativeScores`. ``qkv_weight [3H, H]``/``qkv_bias [3H]``: the layer's fused
        projections (DeBERTa share_att_key); ``pos_key``/``pos_query``: its own position projections, if any."""
        cfg = self.cfg
        if cfg.relative_attention == "bias":
            return RelativeScores(self.index, bias=self.table.t())  # [heads, R]
        H, heads = cfg.hidden_size, cfg.num_heads

        def project(w, b):  # [R, H] -> [heads, R, d]
            return F.linear(self.table, w, b).view(-1, heads, cfg.head_dim).transpose(0, 1)

        pk = pq = None
        if "c2p" in cfg.pos_att_type:
            pk = (project(qkv_weight[H:2 * H], qkv_bias[H:2 * H]) if cfg.share_att_key
                  else project(pos_key.weight, pos_key.bias))
        if "p2c" in cfg.pos_att_type:
            pq = (project(qkv_weight[:H], qkv_bias[:H]) if cfg.share_att_key
                  else project(pos_query.weight, pos_query.bias))
        return RelativeScores(self.index, pos_key=pk, pos_query=pq)
