"""SparseEncoder: SPLADE-style sparse embeddings from a masked-LM checkpoint, run padding-free.

The masked-LM head (dense + activation + LayerNorm, then the decoder tied to the word embeddings, plus its bias)
runs on the packed hidden states ``[T, H]``: pads are never computed. The SPLADE reduction is
:class:`padfree.pipelines.SparsePipeline`'s (``head_tokens`` at a time, by default as many as fit in
:data:`CHUNK_ELEMENTS` logits); :class:`SparseEncoder` is its library facade.

Reads a sentence-transformers SparseEncoder directory (``modules.json``: ``MLMTransformer``, or ``Transformer``
with ``transformer_task: fill-mask``, then ``SpladePooling``) or a plain ``*ForMaskedLM`` directory (max, relu).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from .batch import PackedBatch
from .batching import check_budget, positive_int
from .directory import read_json, read_layout
from .hub import resolve_model
from .heads import _linear
from .loading import Loaded, load
from .ops.activations import apply_activation, canonical_activation
from .pipelines import SparsePipeline
from .text import TextSide
from .tokenizer import check_texts

CHUNK_ELEMENTS = 1 << 24  # logits per chunk by default (64 MiB in fp32): 549 tokens of a 30522-entry vocabulary
POOLING_STRATEGIES = ("max", "sum")
ACTIVATIONS = ("relu", "log1p_relu")


class MLMHead:
    """A checkpoint's masked-LM head on packed hidden states: ``[n, H]`` -> ``[n, V]`` logits."""

    def __init__(self, loaded: Loaded):
        spec, state, enc = loaded.family.mlm_head, loaded.hf_state, loaded.encoder
        if spec is None:
            raise ValueError(f"family {loaded.family.name} has no masked-LM head mapping; SparseEncoder supports "
                             "BERT, RoBERTa and DistilBERT *ForMaskedLM checkpoints")
        if f"{spec.dense}.weight" not in state:
            raise ValueError(f"checkpoint has no masked-LM head ({spec.dense}.weight is missing): SparseEncoder "
                             f"needs a *ForMaskedLM checkpoint; got architectures "
                             f"{loaded.hf_config.get('architectures')}")
        dev, dt = enc.device, enc.dtype
        self.dense = _linear(state, spec.dense, dev, dt)
        act = spec.activation
        self.activation = canonical_activation(act[1:] if act.startswith("=") else loaded.hf_config.get(act, "gelu"))
        norm_w, norm_b = _linear(state, spec.norm, dev, dt)
        self.norm = (norm_w, norm_b, enc.config.layer_norm_eps)
        tied = f"{spec.decoder}.weight" not in state
        if tied and not loaded.hf_config.get("tie_word_embeddings", True):
            raise ValueError(f"checkpoint has no {spec.decoder}.weight and does not tie it to the word embeddings")
        # tied: the encoder's own table (the checkpoint's word embeddings, already on the device), not a copy
        weight = enc.embeddings.word.weight.detach() if tied else state[f"{spec.decoder}.weight"].to(dev, dt)
        bias = state.get(spec.bias, state.get(f"{spec.decoder}.bias"))
        if bias is None:
            raise ValueError(f"checkpoint has no {spec.bias} (the masked-LM head's vocabulary bias)")
        self.decoder = (weight, bias.to(device=dev, dtype=dt))
        self.vocab_size = weight.shape[0]

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        x = apply_activation(F.linear(hidden, *self.dense), self.activation)
        w, b, eps = self.norm
        x = F.layer_norm(x, (x.shape[-1],), w, b, eps)
        return F.linear(x, *self.decoder)


def read_modules(path: Path) -> tuple[Path, str, str]:
    """(masked-LM checkpoint dir, pooling strategy, activation) of a SparseEncoder directory; a directory
    without ``modules.json`` is a plain ``*ForMaskedLM`` checkpoint (max, relu)."""
    layout = read_layout(path)
    if not layout.modular:
        return path, "max", "relu"
    layout.check_kinds(("MLMTransformer", "Transformer", "SpladePooling"), " for SparseEncoder")
    model, pooling = layout.find("MLMTransformer", "Transformer"), layout.find("SpladePooling")
    if model is None or pooling is None:
        raise ValueError(f"{path}: a SparseEncoder directory needs an MLMTransformer and a SpladePooling module")
    default = "fill-mask" if model.kind == "MLMTransformer" else "feature-extraction"  # as sentence-transformers
    task = read_json(model.path / "sentence_bert_config.json").get("transformer_task", default)
    if task != "fill-mask":
        raise ValueError(f"{path}: its Transformer module has transformer_task {task!r}; SPLADE needs "
                         "'fill-mask' (a masked-LM head)")
    conf = pooling.config()
    return model.path, conf.get("pooling_strategy", "max"), conf.get("activation_function", "relu")


class SparseEncoder:
    """Text in, sparse vocabulary-sized vectors out: ``encode(texts)`` -> torch sparse COO ``[N, V]`` (float32,
    coalesced), as sentence-transformers' ``SparseEncoder.encode`` returns by default (``[V]`` for one string).

    Texts are tokenized as :class:`SentenceEncoder` does (``max_seq_length``, lower-casing, prompts).
    """

    def __init__(self, encoder, text: TextSide, head: MLMHead, pooling_strategy: str = "max",
                 activation_function: str = "relu", head_tokens: int | None = None):
        if pooling_strategy not in POOLING_STRATEGIES:
            raise ValueError(f"unsupported SpladePooling pooling_strategy {pooling_strategy!r}; padfree supports "
                             f"{POOLING_STRATEGIES}")
        if activation_function not in ACTIVATIONS:
            raise ValueError(f"unsupported SpladePooling activation_function {activation_function!r}; padfree "
                             f"supports {ACTIVATIONS}")
        if head_tokens is None:
            head_tokens = max(1, CHUNK_ELEMENTS // head.vocab_size)
        positive_int("head_tokens", head_tokens)
        self.pipeline = SparsePipeline(encoder, text, head, pooling_strategy, activation_function, head_tokens)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        max_seq_length: int | None = None, head_tokens: int | None = None, *,
                        revision: str | None = None, token: str | None = None) -> "SparseEncoder":
        """From a sentence-transformers SparseEncoder directory or a plain ``*ForMaskedLM`` directory, or its Hub
        ID (``org/name``; ``revision``, ``token``: see :func:`padfree.hub.resolve_model`).
        ``max_seq_length`` overrides the directory's (``sentence_bert_config.json``, else the tokenizer's
        ``model_max_length``, capped by the model's position limit)."""
        path = resolve_model(path, revision, token)
        model_dir, strategy, activation = read_modules(path)
        loaded = load(model_dir, dtype, device, backend)
        head = MLMHead(loaded)  # fails before the tokenizer is read if there is no head
        enc = loaded.encoder
        text = TextSide.from_dir(model_dir, path, enc.config.max_sequence_length, max_seq_length)
        return cls(enc, text, head, strategy, activation, head_tokens)

    # the pipeline's parts
    encoder = property(lambda self: self.pipeline.encoder)
    text = property(lambda self: self.pipeline.text)
    tokenizer = property(lambda self: self.pipeline.text.tokenizer)
    head = property(lambda self: self.pipeline.head)
    pooling_strategy = property(lambda self: self.pipeline.pooling_strategy)
    activation_function = property(lambda self: self.pipeline.activation_function)
    vocab_size = property(lambda self: self.pipeline.vocab_size)

    @property
    def head_tokens(self) -> int:
        """Tokens whose ``[n, vocab]`` logits are made at once: the memory of a batch's head."""
        return self.pipeline.head_tokens

    @head_tokens.setter
    def head_tokens(self, value: int) -> None:
        self.pipeline.head_tokens = positive_int("head_tokens", value)

    @property
    def max_seq_length(self) -> int:
        return self.pipeline.text.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.pipeline.text.max_seq_length = value

    def tokenize(self, texts: Iterable[str], truncate: bool = True, prompt: str | None = None,
                 truncation_side: str | None = None) -> list[list[int]]:
        """Token ids as :meth:`SentenceEncoder.tokenize`: cut to ``max_seq_length`` or ``ValueError``."""
        return self.pipeline.text.tokenize(texts, truncate, prompt, truncation_side)

    @torch.inference_mode()
    def pooled(self, hidden: torch.Tensor, batch: PackedBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """SPLADE pooling of a packed forward: per sequence, ``(indices int64, values float32)`` of its
        non-zero vocabulary weights, indices ascending."""
        return self.pipeline.pooled(hidden, batch)

    def encode(self, texts: Iterable[str] | str, batch_tokens: int | None = None, batch_size: int | None = None,
               truncate: bool = True, prompt_name: str | None = None, prompt: str | None = None,
               convert_to_sparse_tensor: bool = True):
        """Sparse vectors in the order of ``texts``: a coalesced torch sparse COO tensor ``[N, V]`` float32 on the
        CPU (``[V]`` for one string), or with ``convert_to_sparse_tensor=False`` a list of ``(indices, values)``
        tensor pairs, one per text (indices ascending). Batching as :meth:`SentenceEncoder.encode` (a budget of
        ``batch_tokens`` real tokens, default 8192, and optionally ``batch_size`` texts)."""
        single = isinstance(texts, str)
        texts = [texts] if single else check_texts(texts)
        budget = check_budget(batch_tokens, batch_size)  # both limits checked before any work
        seqs = self.pipeline.prepare(texts, truncate, prompt=self.pipeline.text.resolve_prompt(prompt, prompt_name))
        rows = [(torch.from_numpy(i), torch.from_numpy(v)) for i, v in self.pipeline.run_all(seqs, budget, batch_size)]
        if not convert_to_sparse_tensor:
            return rows[0] if single else rows
        if single:
            idx, val = rows[0]
            return torch.sparse_coo_tensor(idx[None], val, (self.vocab_size,), is_coalesced=True,
                                           check_invariants=False)
        return to_sparse_tensor(rows, self.vocab_size)


def to_sparse_tensor(rows: list[tuple[torch.Tensor, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """A coalesced sparse COO ``[N, vocab_size]`` float32 from per-row ``(indices, values)`` (indices ascending)."""
    if not rows:
        return torch.sparse_coo_tensor(torch.empty(2, 0, dtype=torch.long), torch.empty(0), (0, vocab_size),
                                       is_coalesced=True, check_invariants=False)
    row_ids = torch.cat([torch.full_like(idx, r) for r, (idx, _) in enumerate(rows)])
    indices = torch.stack([row_ids, torch.cat([idx for idx, _ in rows])])
    return torch.sparse_coo_tensor(indices, torch.cat([v for _, v in rows]), (len(rows), vocab_size),
                                   is_coalesced=True, check_invariants=False)
