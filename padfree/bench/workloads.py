"""Workloads of ``padfree bench``: W1 (the ByteTransformer protocol) and the FLOP count everything is judged by.

W1 is synthetic, as in the paper: a BERT-family model of a standard shape with random weights from a fixed
seed, batches whose lengths are integers drawn uniformly in ``[ceil(0.2 * max), max]`` (mean 0.6 * max),
random in-vocabulary token ids, right padding. Every case is generated from ``(seed, batch, max_len)`` alone,
so a case is the same whatever else the run contains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FULL_BATCHES = (1, 2, 4, 8, 16)
FULL_MAX_LENS = (64, 128, 256, 384, 512, 768, 1024)
QUICK_BATCHES = (16,)
QUICK_MAX_LENS = (64, 128, 256, 512)

MODEL_SHAPES = ("bert-base", "distilbert-base", "albert-base", "deberta-v3-base", "mpnet-base", "modernbert-base",
                "eurobert-210m", "nomic-embed-text", "jina-v3")

# W1-long: long documents on a model made for them (ModernBERT-base: 8192 positions, rotary, GeGLU, local layers)
LONG_SHAPE = "modernbert-base"
LONG_BATCHES = (2,)
LONG_MAX_LENS = (1024, 2048, 4096, 8192)


def w1_grid(quick: bool) -> list[tuple[int, int]]:
    """``(batch, max_len)`` pairs of W1, in the order they run (by max length, then batch)."""
    batches, lens = (QUICK_BATCHES, QUICK_MAX_LENS) if quick else (FULL_BATCHES, FULL_MAX_LENS)
    return [(b, s) for s in lens for b in batches]


def w1_long_grid() -> list[tuple[int, int]]:
    """``(batch, max_len)`` pairs of W1-long, in the order they run."""
    return [(b, s) for s in LONG_MAX_LENS for b in LONG_BATCHES]


def w1_lengths(batch: int, max_len: int, seed: int = 0) -> list[int]:
    """``batch`` lengths, integers uniform in ``[ceil(0.2 * max_len), max_len]``; fixed by (seed, batch, max_len)."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"batch and max_len must be >= 1; got {batch}, {max_len}")
    g = torch.Generator().manual_seed(_case_seed(seed, batch, max_len))
    lo = max(1, math.ceil(0.2 * max_len))
    return torch.randint(lo, max_len + 1, (batch,), generator=g).tolist()


def _case_seed(seed: int, batch: int, max_len: int) -> int:
    return seed * 1_000_003 + batch * 10_007 + max_len


@dataclass(frozen=True)
class W1Case:
    batch: int
    max_len: int
    lengths: tuple[int, ...]
    input_ids: torch.Tensor       # [B, S] int64, random in-vocab ids, zeros (pad) after each length
    attention_mask: torch.Tensor  # [B, S] int64, ones on the real tokens (right padding)

    @property
    def tokens(self) -> int:
        """Valid (real) tokens of the batch."""
        return sum(self.lengths)

    @property
    def padded_tokens(self) -> int:
        """Tokens a padded implementation computes: batch * padded width."""
        return self.input_ids.numel()


def make_w1_case(batch: int, max_len: int, vocab_size: int, seed: int = 0, pad_to_longest: bool = False) -> W1Case:
    """One W1 batch: lengths from :func:`w1_lengths`, padded to ``max_len`` (the protocol's max, not the
    batch's longest, as a padded framework given that max length would); ``pad_to_longest``: padded to the
    batch's longest sequence instead (a tokenizer's ``padding=True``; W1-long)."""
    lengths = w1_lengths(batch, max_len, seed)
    g = torch.Generator().manual_seed(_case_seed(seed, batch, max_len) + 1)
    ids = torch.randint(1, vocab_size, (batch, max_len), generator=g)  # [B, S]; id 0 is the pad token
    width = max(lengths) if pad_to_longest else max_len
    ids = ids[:, :width]
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # [B, S]
    return W1Case(batch, max_len, tuple(lengths), ids * mask, mask)


def hf_config(shape: str, max_len: int = 512):
    """A ``transformers`` config of the named standard shape (position table extended to ``max_len``)."""
    import transformers as tf
    positions = max(512, max_len)
    if shape == "bert-base":
        return tf.BertConfig(max_position_embeddings=positions)
    if shape == "distilbert-base":
        return tf.DistilBertConfig(max_position_embeddings=positions)
    if shape == "albert-base":  # ALBERT base: hidden 768, 12 heads, FFN 3072, embeddings 128, shared layers
        return tf.AlbertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                               embedding_size=128, max_position_embeddings=positions)
    if shape == "deberta-v3-base":  # DeBERTa-v3 base: disentangled attention, shared keys, 256 log buckets
        return tf.DebertaV2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, vocab_size=128100, type_vocab_size=0,
                                  relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
                                  position_buckets=256, norm_rel_ebd="layer_norm", position_biased_input=False,
                                  max_relative_positions=-1, layer_norm_eps=1e-7, max_position_embeddings=positions)
    if shape == "mpnet-base":  # MPNet base (all-mpnet-base-v2's encoder): relative bias, 32 buckets, positions from 2
        return tf.MPNetConfig(max_position_embeddings=positions + 2)
    if shape == "modernbert-base":  # transformers' defaults are ModernBERT-base: 22 layers, hidden 768, GeGLU 1152,
        return tf.ModernBertConfig(max_position_embeddings=max(8192, max_len))  # every 3rd layer global, window 128
    # transformers' defaults are these models' shapes too: EuroBERT-210m (12 x 768, SwiGLU 3072, 8192 positions),
    # nomic-embed-text (12 x 768, SwiGLU 3072, rotary, its 2048-token context), jina-embeddings-v3 (24 x 1024,
    # FFN 4096, rotary, 8192 positions after the RoBERTa offset)
    if shape == "eurobert-210m":
        return tf.EuroBertConfig(max_position_embeddings=max(8192, max_len))
    if shape == "nomic-embed-text":
        return tf.NomicBertConfig()
    if shape == "jina-v3":
        return tf.JinaEmbeddingsV3Config(max_position_embeddings=max(8194, max_len + 2))
    raise ValueError(f"unknown model shape {shape!r}; known: {list(MODEL_SHAPES)}")


def build_hf_model(shape: str, max_len: int, seed: int = 0, attn_implementation: str = "eager"):
    """The base model of ``shape`` with random weights from ``seed`` (eval mode, fp32, CPU)."""
    import transformers as tf
    cfg = hf_config(shape, max_len)
    cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    cls = {"bert-base": tf.BertModel, "distilbert-base": tf.DistilBertModel, "albert-base": tf.AlbertModel,
           "deberta-v3-base": tf.DebertaV2Model, "mpnet-base": tf.MPNetModel, "modernbert-base": tf.ModernBertModel,
           "eurobert-210m": tf.EuroBertModel, "nomic-embed-text": tf.NomicBertModel,
           "jina-v3": tf.JinaEmbeddingsV3Model}[shape]
    kwargs = {"add_pooling_layer": False} if shape in ("bert-base", "albert-base", "mpnet-base") else {}
    return cls(cfg, **kwargs).eval()


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model."""
    layers: int
    hidden: int
    ffn: int
    gated: bool = False      # the FFN's input linear is [2F, H] (GeGLU / SwiGLU)
    local_layers: int = 0    # layers whose query i sees only keys |i - j| <= window
    window: int = 0

    @classmethod
    def of(cls, hf_cfg) -> "Shape":
        get = lambda *names: next(getattr(hf_cfg, n) for n in names if hasattr(hf_cfg, n))  # noqa: E731
        dims = get("num_hidden_layers", "n_layers"), get("hidden_size", "dim"), get("intermediate_size", "hidden_dim")
        if hf_cfg.model_type in ("eurobert", "nomic_bert"):  # SwiGLU
            return cls(*dims, gated=True)
        if hf_cfg.model_type != "modernbert":
            return cls(*dims)
        local = sum(t == "sliding_attention" for t in hf_cfg.layer_types)
        return cls(*dims, gated=True, local_layers=local, window=hf_cfg.local_attention // 2)


def encoder_flops(lengths, shape: Shape) -> int:
    """FLOPs of the encoder layers over the valid tokens only (a multiply-add counts 2).

    Per layer and sequence of length L, with hidden size H and FFN size F:
    - the four projections (QKV ``3H x H``, output ``H x H``) and the FFN (``F x H`` and ``H x F``):
      ``2 * L * (4 * H * H + 2 * H * F)``;
    - attention scores ``Q K^T`` and context ``P V`` over all heads: ``2 * 2 * L * L * H``.
    A gated FFN's input linear is ``2F x H`` (``2 * L * 3 * H * F`` for the FFN); a local layer scores only the
    query-key pairs inside its window (:func:`band_pairs`).
    Not counted (a few % at most): embeddings, biases, softmax, activations, LayerNorms, and family extras
    (ALBERT's embedding projection, MPNet's and DeBERTa's relative-position terms, rotary), so the figure is
    conservative.
    """
    H, F = shape.hidden, shape.ffn
    ffn = (3 if shape.gated else 2) * H * F
    dense = shape.layers * sum(2 * L * (4 * H * H + ffn) for L in lengths)
    glob = (shape.layers - shape.local_layers) * sum(4 * L * L * H for L in lengths)
    local = shape.local_layers * sum(4 * band_pairs(L, shape.window) * H for L in lengths)
    return dense + glob + local


def position_limit(hf_cfg) -> int:
    """The longest sequence a model's config allows, as padfree reads the config (its position table less
    RoBERTa-style offsets)."""
    from ..models.families import family_for_config
    c = hf_cfg.to_dict()
    return family_for_config(c).make_config(c).max_sequence_length


def band_pairs(length: int, window: int) -> int:
    """Query-key pairs ``(i, j)`` of one sequence with ``|i - j| <= window``."""
    w = min(window, length - 1)
    return length + 2 * (w * length - w * (w + 1) // 2)


def attention_flops(lengths, hidden: int) -> int:
    """FLOPs of one multi-head attention (scores and context) over the valid tokens: ``sum 4 * L^2 * H``."""
    return sum(4 * L * L * hidden for L in lengths)
