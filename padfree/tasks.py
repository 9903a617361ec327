"""Tasks: what a loaded checkpoint can do, as the server (and later the jobs and the Ray adapters) see it.

A task turns inputs into :class:`Seq` (token ids, cut or refused against the model's limit) and runs a list of
them as one packed forward (:meth:`Task.run`, on the scheduler's worker thread), returning one result per
sequence in the order given. The callers never touch model internals.

- :class:`EmbedTask` (a sentence-transformers directory, or a plain encoder: mean pooling): a pooled vector per
  sequence, every token's hidden state (``Seq.tokens``), or one pooled vector per chunk (``Seq.chunks``).
- :class:`ClassifyTask` (a ``*ForSequenceClassification`` or CrossEncoder directory): the logits of each text or
  pair; reranking is this with (query, passage) pairs.
- :class:`SparseTask` (a sentence-transformers SparseEncoder directory, or a plain ``*ForMaskedLM``): a SPLADE
  vector per sequence, as ``(indices, values)`` of its non-zero vocabulary weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .heads import CrossEncoder
from .sentence import ChunkLayout, SentenceEncoder
from .sparse import SparseEncoder
from .tokenizer import InputTooLong, Tokenizer


@dataclass(frozen=True)
class Seq:
    """One tokenized input."""
    ids: list[int]
    type_ids: list[int] | None = None
    skip: int = 0          # leading tokens (a prompt) that pooling leaves out (include_prompt=False models)
    tokens: bool = False   # EmbedTask: every token's hidden state [n, H] instead of the pooled vector [D]
    chunks: ChunkLayout | None = None  # EmbedTask: one pooled vector per chunk [n_chunks, D] (late chunking)
    task: str | None = None  # the task adapter it runs (jina-embeddings-v3); None: the one chosen at load


class Task:
    """Common part: the model's limit, and :meth:`run` (sort by length, pack, one forward, unsort)."""
    kind: str                 # "embed", "classify" or "sparse"
    tokenizer: Tokenizer
    max_input_length: int     # tokens per sequence, special tokens included

    def __init__(self, encoder):
        self.encoder = encoder

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.dtype

    @torch.inference_mode()
    def run(self, seqs: Sequence[Seq]) -> list[np.ndarray]:
        """One packed forward over ``seqs`` (one per task adapter among them); one float32 result per sequence,
        in the given order. Inside a forward sequences go by length, so that equal lengths sit side by side
        (attention runs once per length)."""
        by_task: dict[str | None, list[int]] = {}
        for i, s in enumerate(seqs):
            by_task.setdefault(s.task, []).append(i)
        out: list = [None] * len(seqs)
        for task, idx in by_task.items():
            encoder = self.encoder if task is None else self.encoder.for_task(task)
            order = sorted(idx, key=lambda i: len(seqs[i].ids))
            ordered = [seqs[i] for i in order]
            types = None
            if encoder.config.type_vocab_size > 1 and any(s.type_ids is not None for s in ordered):
                types = [s.type_ids or [0] * len(s.ids) for s in ordered]
            batch = PackedBatch.from_sequences([s.ids for s in ordered], types, device=encoder.device)
            for i, r in zip(order, self.finish(encoder.forward_packed(batch), batch, ordered)):
                out[i] = r
        return out

    def check_task(self, task: str | None) -> None:
        """``ValueError`` naming the known tasks for a task this model cannot run (cheap: nothing is merged)."""
        if task is None:
            return
        adapters = self.encoder.adapters
        if adapters is None:
            raise ValueError(f"task {task!r} given, but this model has no task adapters")
        if task not in adapters.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {list(adapters.tasks)}")

    def finish(self, hidden: torch.Tensor, batch: PackedBatch, seqs: list[Seq]) -> list[np.ndarray]:
        raise NotImplementedError

    def _check_lengths(self, ids: list[list[int]], what: str = "input") -> None:
        limit = self.max_input_length
        for i, s in enumerate(ids):
            if len(s) > limit:
                raise InputTooLong(f"{what} {i} has {len(s)} tokens, more than the model's limit of {limit}; "
                                 "set truncate to cut it")
            if not s:
                raise ValueError(f"{what} {i} is empty (no tokens)")

    def from_ids(self, ids: Sequence[Sequence[int]], truncate: bool, side: str = "right",
                 task: str | None = None) -> list[Seq]:
        """Token ids given by the caller (taken as they are: no special tokens added), range-checked against
        the vocabulary and cut to the limit on ``side`` if ``truncate``; ``task`` as in :meth:`EmbedTask.tokenize`."""
        self.check_task(task)
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
        self._check_lengths(out)
        return [Seq(s, task=task) for s in out]


class EmbedTask(Task):
    kind = "embed"

    def __init__(self, st: SentenceEncoder):
        super().__init__(st.encoder)
        self.st = st
        self.tokenizer = st.tokenizer

    @property
    def max_input_length(self) -> int:
        return self.st.max_seq_length

    @property
    def dimension(self) -> int:
        return self.st.dimension

    @property
    def normalizes(self) -> bool:
        """Whether the directory's pipeline ends in Normalize (the vectors OpenAI's route returns as they are)."""
        return self.st.normalize_embeddings

    def tokenize(self, texts: Sequence[str], truncate: bool, side: str | None = None, prompt: str | None = None,
                 tokens: bool = False, chunks=None, chunk_tokens: int | None = None, task: str | None = None
                 ) -> list[Seq]:
        """Texts with ``prompt`` prepended; ``ValueError`` naming a too-long text and the limit unless
        ``truncate``. With ``chunks`` or ``chunk_tokens`` each text is a document of late chunking
        (:meth:`SentenceEncoder.encode_chunks`: its result is ``[n_chunks, D]``, its spans in ``Seq.chunks``).
        ``task``: the task adapter to run (jina-embeddings-v3), checked here."""
        self.check_task(task)
        if chunks is not None or chunk_tokens is not None:
            ids, layouts = self.st.chunk_layouts(texts, chunks, chunk_tokens, truncate, prompt, side)
            return [Seq(s, chunks=c, task=task) for s, c in zip(ids, layouts)]
        ids = self.st.tokenize(texts, truncate=truncate, prompt=prompt, truncation_side=side)
        skip = self.st.prompt_skip(prompt)
        return [Seq(s, skip=skip, tokens=tokens, task=task) for s in ids]

    def finish(self, hidden, batch, seqs):
        skips = torch.tensor([s.skip for s in seqs], device=hidden.device)
        pooled = self.st.pooled(hidden, batch, skips if skips.any() else 0).cpu().numpy()  # [B, D]
        chunked = [None] * len(seqs)
        if any(s.chunks is not None for s in seqs):
            chunked = [c if c is None else c.cpu().numpy()
                       for c in self.st.pooled_chunks(hidden, batch, [s.chunks for s in seqs])]
        starts = batch.host.lengths
        out, start = [], 0
        for b, (s, n) in enumerate(zip(seqs, starts)):
            out.append(hidden[start:start + n].float().cpu().numpy() if s.tokens
                       else pooled[b] if chunked[b] is None else chunked[b])
            start += n
        return out


class ClassifyTask(Task):
    kind = "classify"

    def __init__(self, ce: CrossEncoder):
        super().__init__(ce.classifier.encoder)
        self.ce = ce
        self.tokenizer = ce.tokenizer
        self.id2label = ce.classifier.id2label

    @property
    def max_input_length(self) -> int:
        return self.ce.max_input_length

    @property
    def num_labels(self) -> int:
        return self.ce.classifier.num_labels

    def tokenize(self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncate: bool = False,
                 side: str | None = None) -> list[Seq]:
        """Texts (or text pairs); ``ValueError`` naming a too-long input and the limit unless ``truncate``."""
        enc = self.tokenizer.encode(texts, pairs, max_length=self.max_input_length if truncate else None,
                                    truncation_side=side)
        ids = [e.ids for e in enc]
        self._check_lengths(ids)
        return [Seq(e.ids, e.type_ids) for e in enc]

    def finish(self, hidden, batch, seqs):
        return list(self.ce.classifier.head(hidden, batch).cpu().numpy())  # [B, num_labels] fp32 rows

    def scores(self, logits: np.ndarray, raw: bool = False) -> np.ndarray:
        """Rerank scores ``[N]`` from logits ``[N, 1]``: the checkpoint's activation (as CrossEncoder.predict),
        or the raw logits."""
        if self.num_labels != 1:
            raise ValueError(f"reranking needs a model with one output; this one has {self.num_labels} labels")
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32)[:, 0])
        return (x if raw else self.ce.activate(x)).numpy()

    def probabilities(self, logits: np.ndarray, raw: bool = False) -> np.ndarray:
        """Per-label scores ``[N, L]``: raw logits, or the checkpoint's own mapping (one output: its
        activation; several: softmax, or sigmoid for multi-label models)."""
        x = torch.from_numpy(np.asarray(logits, dtype=np.float32))
        if raw:
            return x.numpy()
        return (self.ce.activate(x) if self.num_labels == 1 else self.ce.classifier.probabilities(x)).numpy()


class SparseTask(Task):
    kind = "sparse"

    def __init__(self, se: SparseEncoder):
        super().__init__(se.encoder)
        self.se = se
        self.st = se.text  # the text side, as EmbedTask's: prompts and tokenization
        self.tokenizer = se.tokenizer

    @property
    def max_input_length(self) -> int:
        return self.se.max_seq_length

    def tokenize(self, texts: Sequence[str], truncate: bool, side: str | None = None,
                 prompt: str | None = None) -> list[Seq]:
        """Texts with ``prompt`` prepended; ``ValueError`` naming a too-long text and the limit unless
        ``truncate``."""
        return [Seq(s) for s in self.se.tokenize(texts, truncate=truncate, prompt=prompt, truncation_side=side)]

    def finish(self, hidden, batch, seqs):
        """Per sequence ``(indices int64, values float32)`` numpy arrays of its non-zero weights."""
        return [(i.cpu().numpy(), v.cpu().numpy()) for i, v in self.se.pooled(hidden, batch)]


def _is_sparse_encoder(path: Path, archs: list[str]) -> bool:
    """A sentence-transformers directory ending in SpladePooling, or a plain ``*ForMaskedLM`` checkpoint."""
    modules = path / "modules.json"
    if modules.is_file():
        return any(m["type"].rsplit(".", 1)[-1] == "SpladePooling" for m in json.loads(modules.read_text()))
    return any(a.endswith("ForMaskedLM") for a in archs)


def _architectures(path: Path) -> list[str]:
    """``architectures`` from the checkpoint's config.json (in the directory or in its Transformer module)."""
    dirs = [path]
    modules = path / "modules.json"
    if modules.is_file():
        dirs += [path / m["path"] for m in json.loads(modules.read_text()) if m.get("path")]
    for d in dirs:
        conf = d / "config.json"
        if conf.is_file():
            return list(json.loads(conf.read_text(encoding="utf-8")).get("architectures") or [])
    raise ValueError(f"{path} has no config.json: not a Hugging Face or sentence-transformers checkpoint")


def load_task(path, dtype: torch.dtype = torch.float32, device="cpu") -> Task:
    """The task a checkpoint directory can do: ``*ForSequenceClassification`` / CrossEncoder directories
    classify and rerank; SparseEncoder (SPLADE) and plain ``*ForMaskedLM`` directories give sparse vectors;
    sentence-transformers directories and plain encoders embed."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a directory")
    archs = _architectures(path)
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return ClassifyTask(CrossEncoder.from_pretrained(path, dtype=dtype, device=device))
    if _is_sparse_encoder(path, archs):
        return SparseTask(SparseEncoder.from_pretrained(path, dtype=dtype, device=device))
    if any(a.endswith(("ForTokenClassification", "ForQuestionAnswering")) for a in archs) and \
            not (path / "modules.json").is_file():
        raise ValueError(f"{path}: architecture {archs} is not served; padfree serve takes sentence-transformers "
                         "directories or encoders (embeddings), *ForSequenceClassification / CrossEncoder "
                         "directories (classification, reranking) and SparseEncoder / *ForMaskedLM directories "
                         "(sparse embeddings)")
    return EmbedTask(SentenceEncoder.from_pretrained(path, dtype=dtype, device=device))
