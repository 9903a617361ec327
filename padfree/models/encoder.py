"""One generic post-LayerNorm encoder that runs on packed tokens ``[T, H]``.

Every family (BERT, RoBERTa, ...) is this module with its own config and weight table; nothing here
ever sees a pad token. The ops it calls are resolved once per device/dtype by the backend registry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import PackedBatch
from ..config import ModelConfig
from ..ops.registry import Kernels


class EncoderLayer(nn.Module):
    """Parameter holder for one layer; the computation is in :meth:`Encoder._layer`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, Fi = cfg.hidden_size, cfg.intermediate_size
        self.qkv = nn.Linear(H, 3 * H)          # Q | K | V fused at load time: one [3H, H] product
        self.attn_out = nn.Linear(H, H)
        self.attn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(H, Fi)
        self.ffn_out = nn.Linear(Fi, H)
        self.ffn_norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, H)
        self.position = nn.Embedding(cfg.max_position_embeddings, H)
        self.token_type = nn.Embedding(cfg.type_vocab_size, H) if cfg.type_vocab_size else None
        self.norm = nn.LayerNorm(H, eps=cfg.layer_norm_eps)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor           # [B, S, H], zeros at pad positions
    pooler_output: torch.Tensor | None = None  # [B, H] when the checkpoint has a pooler

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.last_hidden_state, self.pooler_output)[i]


class Encoder(nn.Module):
    """A padding-free encoder. Build it with :func:`padfree.from_pretrained`."""

    def __init__(self, cfg: ModelConfig, has_pooler: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size) if has_pooler else None
        self.kernels: Kernels | None = None  # set by prepare()

    def prepare(self, backend: str = "auto") -> "Encoder":
        """Resolve the ops for this encoder's device and dtype (call after loading or moving it)."""
        w = self.embeddings.word.weight
        self.kernels = Kernels.resolve(w.device, w.dtype, self.config.head_dim, backend)
        self.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.embeddings.word.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word.weight.dtype

    # ------------------------------------------------------------------ packed path
    def check_batch(self, batch: PackedBatch) -> None:
        """``ValueError`` if the batch cannot be encoded by this model (ids, types or lengths out of range)."""
        cfg = self.config
        if batch.max_seqlen > cfg.max_sequence_length:
            raise ValueError(f"sequence length {batch.max_seqlen} exceeds the model's limit of "
                             f"{cfg.max_sequence_length} tokens (max_position_embeddings)")
        ids = batch.input_ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        types = batch.token_type_ids
        n_types = max(cfg.type_vocab_size, 1)
        if int(types.min()) < 0 or int(types.max()) >= n_types:
            raise ValueError(f"token_type_ids must be in [0, {n_types}); got values in "
                             f"[{int(types.min())}, {int(types.max())}]")

    @torch.inference_mode()
    def forward_packed(self, batch: PackedBatch, check: bool = True) -> torch.Tensor:
        """Hidden states of every real token: ``[T, H]``."""
        if self.kernels is None:
            self.prepare()
        if check:
            self.check_batch(batch)
        k, cfg, e = self.kernels, self.config, self.embeddings
        x = k.embed_layer_norm(batch.input_ids, batch.position_ids, batch.token_type_ids, e.word.weight,
                               e.position.weight[cfg.position_offset:],  # offset rows skipped by a view
                               None if e.token_type is None else e.token_type.weight,
                               e.norm.weight, e.norm.bias, cfg.layer_norm_eps)  # [T, H]
        for layer in self.layers:
            x = self._layer(layer, x, batch)
        return x

    def _layer(self, layer: EncoderLayer, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        k, cfg = self.kernels, self.config
        # each op is a linear fused with its consumer (a backend's epilogue, or F.linear + the primitive)
        ctx = k.qkv_varlen_attention(x, layer.qkv.weight, layer.qkv.bias, batch.cu_seqlens, batch.max_seqlen,
                                     cfg.num_heads)  # [T, H]
        h = k.linear_residual_layer_norm(ctx, layer.attn_out.weight, layer.attn_out.bias, x,
                                         layer.attn_norm.weight, layer.attn_norm.bias, cfg.layer_norm_eps)
        f = k.linear_bias_act(h, layer.ffn_in.weight, layer.ffn_in.bias, cfg.activation)  # [T, F]
        return k.linear_residual_layer_norm(f, layer.ffn_out.weight, layer.ffn_out.bias, h,
                                            layer.ffn_norm.weight, layer.ffn_norm.bias, cfg.layer_norm_eps)

    def pool_cls(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The BERT pooler: ``tanh(W · h_CLS + b)``, ``[B, H]``; ``ValueError`` if the checkpoint has none."""
        if self.pooler is None:
            raise ValueError("this checkpoint has no pooler weights")
        cls = hidden[batch.cu_seqlens[:-1].long()]  # [B, H], first token of each sequence
        return torch.tanh(F.linear(cls, self.pooler.weight, self.pooler.bias))

    # ------------------------------------------------------------------ Hugging Face-compatible path
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        """``input_ids``/``attention_mask``/``token_type_ids``: ``[B, S]``. Padding may be on either side;
        positions restart at 0 at each sequence's first real token."""
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = PackedBatch.from_padded(input_ids, attention_mask, token_type_ids)
        hidden = self.forward_packed(batch)
        pooled = self.pool_cls(hidden, batch) if self.pooler is not None else None
        return EncoderOutput(batch.unpack(hidden), pooled)
