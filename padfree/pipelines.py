"""Pipelines: what a loaded checkpoint can do, the one contract under every front door.

A pipeline turns inputs into :class:`Seq` (``prepare``: token ids cut or refused against the model's limit, and
the output each sequence asks for) and runs a list of them as packed forwards (:meth:`Pipeline.run`), returning
the final row of each sequence in the order given: normalized, cut to its Matryoshka dimensions, activated into
scores or probabilities, or reduced to its sparse weights, all done here, once. The library's classes
(:class:`padfree.SentenceEncoder`, ...), the HTTP routes, the jobs and the Ray adapters only move rows in and out.

- :class:`EmbedPipeline`: a pooled vector per sequence (through the directory's modules after Pooling: Dense,
  LayerNorm, Normalize), every token's hidden state (``Seq.tokens``), or one pooled vector per chunk
  (``Seq.chunks``, late chunking); float32 or quantized (``Seq.precision``).
- :class:`ClassifyPipeline`: per text or pair, its logits, its scores (the checkpoint's activation: reranking) or
  its probabilities.
- :class:`SparsePipeline`: a SPLADE vector per sequence, as ``(indices, values)`` of its non-zero weights.
- :class:`TokenClassifyPipeline`: per sequence, its tokens' logits (the library's named-entity tagging).

Pipelines hold the model-side pieces they are given (encoder, pooling modes, heads) and import no front door.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .batching import by_length, positive_int, run_batched
from .pooling import normalize as unit_norm, pool
from .quantize import RANGED, check_precision, check_ranges, quantize, width
from .text import ChunkLayout, TextSide
from .tokenizer import InputTooLong, Tokenizer, check_texts

OUTPUTS = ("logits", "scores", "probabilities")  # what a classification sequence asks for
WARM_UP_TEXTS = ["warm up the model", "and its kernels " * 8]


@dataclass(frozen=True)
class Seq:
    """One tokenized input, with the output it asks for."""
    ids: list[int]
    type_ids: list[int] | None = None
    adapter: str | None = None       # the LoRA adapter it runs (jina-embeddings-v3); None: the one chosen at load
    # embeddings
    skip: int = 0                    # leading tokens (a prompt) that pooling leaves out (include_prompt=False)
    tokens: bool = False             # every token's hidden state [n, H] instead of the pooled vector [D]
    chunks: ChunkLayout | None = None  # one pooled vector per chunk [n_chunks, D] (late chunking)
    normalize: bool = False          # unit norm (after the cut to ``dimensions``)
    dimensions: int | None = None    # Matryoshka: the first this many dimensions
    precision: str = "float32"       # quantized after the cut and the norm: one of padfree.quantize.PRECISIONS
    ranges: np.ndarray | None = field(default=None, compare=False)  # int8/uint8: [2, D'] bounds; None: per vector
    # classification
    output: str = "probabilities"    # one of OUTPUTS


class Pipeline:
    """Common part: the model's limit, the adapter check, and :meth:`run` (by adapter, sorted by length, one
    packed forward each, rows in the given order)."""
    kind: str                 # "embed", "classify" or "sparse"
    tokenizer: Tokenizer

    def __init__(self, encoder):
        self.encoder = encoder

    @property
    def dtype(self) -> torch.dtype:
        """What the model was loaded as: its weights' dtype, or ``torch.int8`` for int8 products."""
        return torch.int8 if self.encoder.products == "int8" else self.encoder.dtype

    @property
    def max_input_length(self) -> int:
        """Tokens per sequence, special tokens included."""
        raise NotImplementedError

    @torch.inference_mode()
    def run(self, seqs: Sequence[Seq]) -> list:
        """One packed forward over ``seqs`` (one per adapter among them); one final row per sequence, in the
        given order. Inside a forward sequences go by length, so that equal lengths sit side by side (attention
        runs once per length)."""
        by_adapter: dict[str | None, list[int]] = {}
        for i, s in enumerate(seqs):
            by_adapter.setdefault(s.adapter, []).append(i)
        out: list = [None] * len(seqs)
        lengths = [len(s.ids) for s in seqs]
        for adapter, idx in by_adapter.items():
            encoder = self.encoder if adapter is None else self.encoder.for_task(adapter)
            order = by_length(idx, lengths)
            ordered = [seqs[i] for i in order]
            types = None
            if encoder.config.type_vocab_size > 1 and any(s.type_ids is not None for s in ordered):
                types = [s.type_ids or [0] * len(s.ids) for s in ordered]
            batch = PackedBatch.from_sequences([s.ids for s in ordered], types, device=encoder.device)
            for i, r in zip(order, self.finish(encoder.forward_packed(batch), batch, ordered)):
                out[i] = r
        return out

    def run_all(self, seqs: Sequence[Seq], budget: int, max_items: int | None = None, sort_all: bool = False,
                progress=None) -> list:
        """:meth:`run` over token-budget batches of ``seqs`` (see :func:`padfree.batching.batches`); the rows
        in the order of ``seqs``."""
        return run_batched(self.run, seqs, [len(s.ids) for s in seqs], budget, max_items, sort_all, progress)

    def finish(self, hidden: torch.Tensor, batch: PackedBatch, seqs: list[Seq]) -> list:
        """The final rows of one forward: ``hidden [T, H]`` of ``batch`` -> one row per sequence."""
        raise NotImplementedError

    def check_adapter(self, adapter: str | None) -> None:
        """``ValueError`` naming the known adapters for one this model cannot run (cheap: nothing is merged)."""
        if adapter is None:
            return
        adapters = self.encoder.adapters
        if adapters is None:
            raise ValueError(f"task {adapter!r} given, but this model has no task adapters")
        if adapter not in adapters.tasks:
            raise ValueError(f"unknown task {adapter!r}; this model's tasks are {list(adapters.tasks)}")

    def warm_up(self) -> None:
        """One small forward, so that the first request does not pay for the kernels' first run."""
        self.run(self.prepare(WARM_UP_TEXTS, truncate=True))

    def prepare(self, texts: Sequence[str], truncate: bool, **options) -> list[Seq]:
        raise NotImplementedError

    def prepare_ids(self, ids: Sequence[Sequence[int]], truncate: bool, side: str = "right",
                    adapter: str | None = None, **options) -> list[Seq]:
        """Token ids given by the caller (taken as they are: no special tokens added), range-checked against the
        vocabulary and cut to the limit on ``side`` if ``truncate``; ``options`` as :meth:`prepare`'s."""
        self.check_adapter(adapter)
        vocab, limit = self.encoder.config.vocab_size, self.max_input_length
        out = []
        for i, s in enumerate(ids):
            s = list(s)
            bad = [t for t in s if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"input {i}: token id {bad[0]!r} is not an int in [0, {vocab}) (the vocabulary)")
            if truncate and len(s) > limit:
                s = s[:limit] if side == "right" else s[-limit:]
            out.append(s)
        self.check_lengths(out)
        return [Seq(s, adapter=adapter, **options) for s in out]

    def check_lengths(self, ids: list[list[int]], what: str = "input") -> None:
        limit = self.max_input_length
        for i, s in enumerate(ids):
            if len(s) > limit:
                raise InputTooLong(f"{what} {i} has {len(s)} tokens, more than the model's limit of {limit}; "
                                   "set truncate to cut it")
            if not s:
                raise ValueError(f"{what} {i} is empty (no tokens)")


class EmbedPipeline(Pipeline):
    """Pooled embeddings of a sentence-transformers directory (or a plain encoder: mean pooling).

    ``steps``: the directory's modules between Pooling and a final Normalize (Dense, LayerNorm, a Normalize in
    the middle), as fp32 torch modules on the encoder's device, applied in order to every pooled vector and to
    every chunk vector of late chunking (so that chunks live in the space of the texts' vectors); never to
    ``Seq.tokens`` (the raw hidden states). ``normalizes``: the directory ends in Normalize (the default of
    ``normalize``, which a caller may turn off). ``truncate_dim``: ``config_sentence_transformers.json``'s
    Matryoshka cut, the default of ``dimensions``."""
    kind = "embed"

    def __init__(self, encoder, text: TextSide, pooling: list[str], normalizes: bool,
                 steps: Sequence[torch.nn.Module] = (), truncate_dim: int | None = None):
        super().__init__(encoder)
        self.text = text
        self.tokenizer = text.tokenizer
        self.pooling = pooling
        self.normalizes = normalizes  # the directory ends in Normalize: its default
        self.steps = tuple(steps)
        self.truncate_dim = truncate_dim

    @property
    def max_input_length(self) -> int:
        return self.text.max_seq_length

    @property
    def pooled_dimension(self) -> int:
        """The width of the pooled vectors, before the steps."""
        return self.encoder.config.hidden_size * len(self.pooling)

    @property
    def dimension(self) -> int:
        """The model's full output width: the last Dense's ``out_features``, else the pooled width."""
        return next((s.out_features for s in reversed(self.steps) if hasattr(s, "out_features")),
                    self.pooled_dimension)

    @property
    def truncate_dim(self) -> int | None:
        """The default of ``dimensions`` (sentence-transformers' ``truncate_dim``); None: the full width."""
        return self._truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value: int | None) -> None:
        if value is not None:
            positive_int("truncate_dim", value)
        self._truncate_dim = value

    def output_options(self, normalize: bool | None = None, dimensions: int | None = None,
                       precision: str = "float32", ranges=None) -> dict:
        """``Seq`` fields of an embedding output: ``normalize`` (None: the directory's), ``dimensions``
        (Matryoshka, at most the model's; None: ``truncate_dim``), ``precision`` (one of
        :data:`padfree.quantize.PRECISIONS`) and, for int8 / uint8, ``ranges`` ``[2, D']`` (per-dimension min and
        max of the D' output dimensions, e.g. :func:`padfree.quantize.calibration_ranges`; None: each vector's
        own; dropped for the other precisions); ``ValueError`` naming a bad one."""
        if dimensions is not None:
            positive_int("dimensions", dimensions)
            if dimensions > self.dimension:
                raise ValueError(f"dimensions={dimensions} is more than the model's {self.dimension}")
        elif self.truncate_dim is not None and self.truncate_dim < self.dimension:
            dimensions = self.truncate_dim
        check_precision(precision)
        if ranges is not None and precision in RANGED:
            ranges = check_ranges(ranges, dimensions or self.dimension)
        return {"normalize": self.normalizes if normalize is None else bool(normalize), "dimensions": dimensions,
                "precision": precision, "ranges": ranges if precision in RANGED else None}

    def width(self, options: dict) -> int:
        """The width of a row for :meth:`output_options`' ``options``: ``dimensions`` (or the model's), or its
        bytes for binary precisions."""
        return width(options.get("dimensions") or self.dimension, options.get("precision", "float32"))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The steps after pooling, in order: pooled vectors ``[n, pooled_dimension]`` -> ``[n, dimension]``
        fp32."""
        for step in self.steps:
            x = step(x)
        return x

    def prepare(self, texts: Sequence[str], truncate: bool = True, side: str | None = None,
                prompt: str | None = None, tokens: bool = False, chunks=None, chunk_tokens: int | None = None,
                adapter: str | None = None, normalize: bool | None = None, dimensions: int | None = None,
                precision: str = "float32", ranges=None) -> list[Seq]:
        """Texts with ``prompt`` prepended; ``InputTooLong`` naming a too-long text and the limit unless
        ``truncate``. With ``chunks`` or ``chunk_tokens`` each text is a document of late chunking (its row is
        ``[n_chunks, D]``, its spans in ``Seq.chunks``). ``tokens``: every token's hidden state (never through
        the steps, normalized, cut nor quantized). ``adapter``: the LoRA adapter to run (jina-embeddings-v3).
        ``normalize``, ``dimensions``, ``precision``, ``ranges``: see :meth:`output_options`."""
        if chunks is not None or chunk_tokens is not None:
            return self.prepare_chunks(texts, chunks, chunk_tokens, truncate, side, prompt, adapter, normalize,
                                       dimensions, precision, ranges)
        self.check_adapter(adapter)
        options = self.output_options(normalize, dimensions, precision, ranges)
        ids = self.text.tokenize(texts, truncate=truncate, prompt=prompt, truncation_side=side)
        skip = self.text.prompt_skip(prompt)
        return [Seq(s, skip=skip, tokens=tokens, adapter=adapter, **options) for s in ids]

    def prepare_chunks(self, documents: Sequence[str], chunks=None, chunk_tokens: int | None = None,
                       truncate: bool = True, side: str | None = None, prompt: str | None = None,
                       adapter: str | None = None, normalize: bool | None = None, dimensions: int | None = None,
                       precision: str = "float32", ranges=None) -> list[Seq]:
        """Documents of late chunking (exactly one of ``chunks`` / ``chunk_tokens``, see
        :meth:`padfree.SentenceEncoder.encode_chunks`): each row is ``[n_chunks, D]``, its spans in
        ``Seq.chunks``; other arguments as :meth:`prepare`'s."""
        self.check_adapter(adapter)
        options = self.output_options(normalize, dimensions, precision, ranges)
        ids, layouts = self.chunk_layouts(documents, chunks, chunk_tokens, truncate, prompt, side)
        return [Seq(s, chunks=c, adapter=adapter, **options) for s, c in zip(ids, layouts)]

    def chunk_layouts(self, documents: Sequence[str], chunks=None, chunk_tokens: int | None = None,
                      truncate: bool = True, prompt: str | None = None, side: str | None = None
                      ) -> tuple[list[list[int]], list[ChunkLayout]]:
        """Token ids of each document and where its chunks lie (:meth:`TextSide.chunk_layouts`), for a model
        whose pooling has a per-chunk meaning (not cls or lasttoken: ``ValueError``)."""
        per_text = [m for m in self.pooling if m in ("cls", "lasttoken")]
        if per_text:
            raise ValueError(f"late chunking pools the tokens of each chunk; this model pools with {per_text[0]!r} "
                             "(one token per text), which has no per-chunk meaning")
        return self.text.chunk_layouts(documents, chunks, chunk_tokens, truncate, prompt, side)

    def pooled(self, hidden: torch.Tensor, batch: PackedBatch, skip: int | torch.Tensor = 0) -> torch.Tensor:
        """The directory's pooling of a packed forward, not normalized: ``[T, H]`` -> ``[B, D]`` fp32.
        ``skip``: leading tokens (the prompt) to leave out, one count for all sequences or one per sequence."""
        if not isinstance(skip, int) or skip:
            hidden, batch = _without_prefix(hidden, batch, skip)
        return torch.cat([pool(hidden, batch, m) for m in self.pooling], dim=-1)

    def pooled_chunks(self, hidden: torch.Tensor, batch: PackedBatch, layouts: Sequence[ChunkLayout | None]
                      ) -> list[torch.Tensor | None]:
        """The directory's pooling over each chunk of a packed forward, not normalized: for sequence ``b``,
        ``[n_chunks, D]`` fp32 over the token ranges of ``layouts[b]`` (None for a sequence without a layout).
        One segment reduction for the whole batch."""
        seq_starts = np.cumsum((0,) + batch.host.lengths[:-1])
        firsts, sizes, counts = [], [], []
        for start, layout in zip(seq_starts, layouts):
            ranges = layout.tokens if layout is not None else ()
            firsts += [start + a for a, _ in ranges]
            sizes += [b - a for a, b in ranges]
            counts.append(len(ranges))
        if not sizes:
            pooled = torch.zeros(0, self.pooled_dimension, device=hidden.device)
        else:
            sizes = np.asarray(sizes, dtype=np.int64)
            index = np.repeat(np.asarray(firsts, dtype=np.int64) - (np.cumsum(sizes) - sizes), sizes) \
                + np.arange(sizes.sum())
            pooled = self.pooled(hidden[torch.from_numpy(index).to(hidden.device)],
                                 _segments(sizes.tolist(), hidden.device))
        return [p if layout is not None else None for p, layout in zip(pooled.split(counts), layouts)]

    def finish(self, hidden, batch, seqs):
        """Per sequence: its vector ``[D']`` or chunk vectors ``[n_chunks, D']`` (through the steps, cut to
        ``dimensions`` D', normalized if asked, then quantized to its ``precision``: float32, or int8 / uint8
        ``[D']``, binary / ubinary ``[ceil(D'/8)]``), or its tokens' hidden states ``[n, H]`` float32; numpy."""
        out: list = [None] * len(seqs)
        pooled_rows = [b for b, s in enumerate(seqs) if not s.tokens and s.chunks is None]
        if pooled_rows:
            skips = torch.tensor([s.skip for s in seqs], device=hidden.device)
            pooled = self.project(self.pooled(hidden, batch, skips if skips.any() else 0))  # [B, D]
            for rows in _groups(seqs, pooled_rows):
                x = pooled if len(rows) == len(seqs) else pooled[rows]
                for b, v in zip(rows, _post(x, seqs[rows[0]])):
                    out[b] = v
        if any(s.chunks is not None for s in seqs):
            chunked = self.pooled_chunks(hidden, batch, [s.chunks for s in seqs])
            for b, (s, c) in enumerate(zip(seqs, chunked)):
                if c is not None:
                    out[b] = _post(self.project(c), s)
        if any(s.tokens for s in seqs):
            start = 0
            for b, (s, n) in enumerate(zip(seqs, batch.host.lengths)):
                if s.tokens:
                    out[b] = hidden[start:start + n].float().cpu().numpy()
                start += n
        return out


def _groups(seqs: Sequence[Seq], rows: list[int]) -> list[list[int]]:
    """``rows`` grouped by their output options (normalize, dimensions, precision, the ranges object), in
    first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for b in rows:
        s = seqs[b]
        groups.setdefault((s.normalize, s.dimensions, s.precision, id(s.ranges)), []).append(b)
    return list(groups.values())


def _post(x: torch.Tensor, seq: Seq) -> np.ndarray:
    """Vectors ``[n, D]`` cut to their first ``seq.dimensions`` (Matryoshka), of unit norm if ``seq.normalize``,
    then at ``seq.precision`` (:func:`padfree.quantize.quantize`): numpy ``[n, D']`` (``[n, ceil(D'/8)]``
    binary)."""
    if seq.dimensions is not None:
        x = x[:, :seq.dimensions]
    x = (unit_norm(x) if seq.normalize else x).cpu().numpy()
    return x if seq.precision == "float32" else quantize(x, seq.precision, seq.ranges)


def _without_prefix(hidden: torch.Tensor, batch: PackedBatch, skip: int | torch.Tensor
                    ) -> tuple[torch.Tensor, PackedBatch]:
    """The hidden states and batch without the first ``skip`` tokens of each sequence (the prompt, for
    ``include_prompt=False``; one count, or ``[B]`` counts); a sequence no longer than its prompt keeps its last
    token."""
    lengths = batch.seqlens
    cut = torch.minimum(lengths - 1, torch.as_tensor(skip, device=lengths.device))  # [B]
    keep = batch.position_ids >= cut.repeat_interleave(lengths, output_size=batch.num_tokens)
    return hidden[keep], _segments((lengths - cut).tolist(), hidden.device)


def _segments(lengths: Sequence[int], device) -> PackedBatch:
    """A batch of sequences of these lengths (ids all 0): the layout :func:`padfree.pooling.pool` reduces over,
    for token states taken out of a forward's batch."""
    return PackedBatch.from_sequences([[0] * n for n in lengths], device=device)


class ClassifyPipeline(Pipeline):
    """Sequence classification and reranking: a ``*ForSequenceClassification`` or CrossEncoder checkpoint.
    ``classifier``: the model side (:class:`padfree.SequenceClassifier`: ``head``, ``num_labels``,
    ``probabilities``); ``activation``: the checkpoint's score function (sigmoid, identity or tanh)."""
    kind = "classify"

    def __init__(self, classifier, tokenizer, activation: str = "identity", max_length: int | None = None):
        super().__init__(classifier.encoder)
        self.classifier = classifier
        self.tokenizer = _need_tokenizer(tokenizer)
        self.activation = activation
        self.max_length = max_length
        self.id2label = classifier.id2label

    @property
    def max_input_length(self) -> int:
        return input_limit(self.tokenizer, self.encoder, self.max_length)

    @property
    def num_labels(self) -> int:
        return self.classifier.num_labels

    def check_reranker(self, name: str) -> None:
        """``ValueError`` where the model (served as ``name``) has more than one label: reranking needs one
        score."""
        if self.num_labels != 1:
            raise ValueError(f"model {name!r} has {self.num_labels} labels; reranking needs one score")

    def prepare(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
                side: str | None = None, output: str = "probabilities") -> list[Seq]:
        """Texts (or text pairs); ``InputTooLong`` naming a too-long input and the limit unless ``truncate``.
        ``output``: "logits", "scores" (the checkpoint's activation: what reranking returns) or
        "probabilities" (one label: its activation; several: softmax, or sigmoid for multi-label models)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}; got {output!r}")
        enc = self.tokenizer.encode(texts, pairs, max_length=self.max_input_length if truncate else None,
                                    truncation_side=side)
        self.check_lengths([e.ids for e in enc])
        return [Seq(e.ids, e.type_ids, output=output) for e in enc]

    def finish(self, hidden, batch, seqs):
        """Per sequence its ``[num_labels]`` float32 row: logits, scores or probabilities as it asks."""
        logits = self.classifier.head(hidden, batch)  # [B, num_labels] fp32
        out: list = [None] * len(seqs)
        for output in dict.fromkeys(s.output for s in seqs):
            rows = [b for b, s in enumerate(seqs) if s.output == output]
            x = logits if len(rows) == len(seqs) else logits[rows]
            for b, v in zip(rows, self.map_logits(x, output).cpu().numpy()):
                out[b] = v
        return out

    def map_logits(self, logits: torch.Tensor, output: str) -> torch.Tensor:
        """Logits ``[N, L]`` as ``output`` asks (see :meth:`prepare`)."""
        if output == "logits":
            return logits
        if output == "scores" or self.num_labels == 1:
            return activate(logits, self.activation)
        return self.classifier.probabilities(logits)


class TokenClassifyPipeline(Pipeline):
    """Token classification (e.g. named entities): per sequence, its tokens' logits ``[n, num_labels]``.
    ``classifier``: the model side (:class:`padfree.TokenClassifier`: ``head``, ``id2label``)."""
    kind = "token-classify"

    def __init__(self, classifier, tokenizer):
        super().__init__(classifier.encoder)
        self.classifier = classifier
        self.tokenizer = _need_tokenizer(tokenizer)
        self.id2label = classifier.id2label

    @property
    def max_input_length(self) -> int:
        return input_limit(self.tokenizer, self.encoder)

    def encodings(self, texts: Sequence[str], truncate: bool = True, side: str | None = None):
        """The texts' ``tokenizers.Encoding`` objects (ids, word ids, character offsets); ``InputTooLong`` naming
        a too-long text and the limit unless ``truncate``."""
        enc = self.tokenizer.encode(check_texts(texts), max_length=self.max_input_length if truncate else None,
                                    truncation_side=side)
        self.check_lengths([e.ids for e in enc])
        return enc

    def prepare(self, texts: Sequence[str], truncate: bool = True, side: str | None = None) -> list[Seq]:
        return [Seq(e.ids) for e in self.encodings(texts, truncate, side)]

    def finish(self, hidden, batch, seqs):
        """Per sequence its tokens' float32 logits ``[n, num_labels]``."""
        logits = self.classifier.head(hidden).cpu().numpy()
        return np.split(logits, np.cumsum(batch.host.lengths[:-1]))


def _need_tokenizer(tokenizer) -> Tokenizer:
    """``tokenizer`` as a :class:`Tokenizer`; ``ValueError`` where there is none (an in-memory model)."""
    if tokenizer is None:
        raise ValueError("no tokenizer: load from a directory with tokenizer.json or pass tokenizer=")
    return Tokenizer.coerce(tokenizer)


def input_limit(tokenizer: Tokenizer, encoder, max_length: int | None = None) -> int:
    """The smallest of ``max_length``, the model's position limit and the tokenizer's own limit."""
    return int(min(x for x in (max_length, encoder.config.max_sequence_length, tokenizer.model_max_length) if x))


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """A CrossEncoder's score function on logits: "sigmoid", "tanh" or "identity"."""
    if activation == "sigmoid":
        return logits.sigmoid()
    if activation == "tanh":
        return logits.tanh()
    return logits


class SparsePipeline(Pipeline):
    """SPLADE: per text, ``max`` (or ``sum``) over its tokens of ``log(1 + relu(mlm_logits))`` (``log1p_relu``:
    ``log1p`` once more), one weight per vocabulary entry; rows are ``(indices, values)`` of the non-zero ones.

    The ``[tokens, vocab]`` logits are made ``head_tokens`` tokens at a time and reduced into their sequences at
    once, so the memory of a batch is bounded by the chunk whatever the batch's size."""
    kind = "sparse"

    def __init__(self, encoder, text: TextSide, head, pooling_strategy: str, activation_function: str,
                 head_tokens: int):
        super().__init__(encoder)
        self.text = text
        self.tokenizer = text.tokenizer
        self.head = head
        self.pooling_strategy = pooling_strategy
        self.activation_function = activation_function
        self.head_tokens = head_tokens

    @property
    def max_input_length(self) -> int:
        return self.text.max_seq_length

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    def prepare(self, texts: Sequence[str], truncate: bool = True, side: str | None = None,
                prompt: str | None = None) -> list[Seq]:
        """Texts with ``prompt`` prepended; ``InputTooLong`` naming a too-long text and the limit unless
        ``truncate``."""
        return [Seq(s) for s in self.text.tokenize(texts, truncate=truncate, prompt=prompt, truncation_side=side)]

    def finish(self, hidden, batch, seqs):
        """Per sequence ``(indices int64, values float32)`` numpy arrays of its non-zero weights."""
        return [(i.cpu().numpy(), v.cpu().numpy()) for i, v in self.pooled(hidden, batch)]

    def pooled(self, hidden: torch.Tensor, batch: PackedBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """SPLADE pooling of a packed forward: per sequence, ``(indices int64, values float32)`` of its non-zero
        vocabulary weights, indices ascending. A sequence that spans chunks carries its partial row to the next."""
        bounds = batch.cu_seqlens.tolist()
        reduce = torch.amax if self.pooling_strategy == "max" else torch.sum
        combine = torch.maximum if self.pooling_strategy == "max" else torch.add
        out: list[tuple[torch.Tensor, torch.Tensor]] = []
        carry = None  # the partial row of the sequence that continues into the next chunk
        for start in range(0, batch.num_tokens, self.head_tokens):
            end = min(start + self.head_tokens, batch.num_tokens)
            x = self.head(hidden[start:end]).float().relu_().log1p_()  # [n, V]
            if self.activation_function == "log1p_relu":
                x.log1p_()
            finished, b = [], len(out)
            while b < batch.batch_size and bounds[b] < end:  # the sequences with tokens in this chunk
                row = reduce(x[max(bounds[b], start) - start:min(bounds[b + 1], end) - start], dim=0)
                if carry is not None:
                    row, carry = combine(row, carry), None
                if bounds[b + 1] > end:
                    carry = row
                    break
                finished.append(row)
                b += 1
            if finished:
                rows = torch.stack(finished)
                r, c = rows.nonzero(as_tuple=True)  # row-major: each row's indices ascending
                counts = torch.bincount(r, minlength=len(finished)).tolist()
                out += zip(c.split(counts), rows[r, c].split(counts))
        return out
