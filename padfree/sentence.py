"""SentenceEncoder: a sentence-transformers directory run padding-free.

Reads ``modules.json`` (Transformer -> Pooling -> optional Normalize) and ``config_sentence_transformers.json``
(prompts), tokenizes with the directory's ``tokenizer.json`` (no ``transformers`` import), batches texts in
arrival order by a budget of real tokens (and optionally a count of texts), and returns embeddings in input order.
A facade over :class:`padfree.pipelines.EmbedPipeline`, which does the work for every front door.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .batching import DEFAULT_BATCH_TOKENS, check_budget
from .directory import read_layout
from .hub import resolve_model
from .loading import from_pretrained
from .models.encoder import Encoder
from .pipelines import EmbedPipeline
from .text import ChunkLayout, TextSide
from .tokenizer import Tokenizer, check_texts

__all__ = ["SentenceEncoder", "Chunked", "ChunkLayout", "DEFAULT_BATCH_TOKENS"]

# sentence-transformers' legacy pooling flags -> padfree mode, in sentence-transformers' concatenation order
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
_POOLING_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
                  "lasttoken": "lasttoken"}  # sentence-transformers >= 6 "pooling_mode" values


def _pooling(conf: dict) -> tuple[list[str], bool]:
    """(padfree modes in concatenation order, include_prompt) from a Pooling module's config.json."""
    if "pooling_mode" in conf:
        raw = conf["pooling_mode"]
        names = [raw] if isinstance(raw, str) else list(raw)
        unknown = [n for n in names if n not in _POOLING_NAMES]
        modes = [_POOLING_NAMES[n] for n in names if n in _POOLING_NAMES]
    else:
        modes = [mode for key, mode in _POOLING_KEYS.items() if conf.get(key)]
        unknown = [k for k, v in conf.items() if k.startswith("pooling_mode") and v and k not in _POOLING_KEYS]
    if unknown or not modes:
        raise ValueError(f"unsupported pooling configuration {conf}; padfree supports "
                         f"{sorted(_POOLING_NAMES)}")
    return modes, bool(conf.get("include_prompt", True))


def read_modules(path: Path) -> tuple[Path, list[str], bool, bool]:
    """(transformer dir, pooling modes in sentence-transformers' concatenation order, include_prompt,
    normalize?) of a sentence-transformers directory; a plain Hugging Face one pools by mean, as
    sentence-transformers does."""
    layout = read_layout(path)
    layout.check_kinds(("Transformer", "Pooling", "Normalize"))
    pooling = layout.find("Pooling")
    modes, include_prompt = _pooling(pooling.config()) if pooling else (["mean"], True)
    return layout.model_dir("Transformer"), modes, include_prompt, layout.find("Normalize") is not None


class SentenceEncoder:
    """Text in, embeddings out: ``encode(texts) -> numpy [N, D]`` (``[D]`` for a single string).

    One instance may be shared by threads: encoding mutates nothing on it (the tokenizer is configured once per
    truncation length, see :mod:`padfree.tokenizer`). Setting ``max_seq_length`` or ``prompts`` while other
    threads encode is not synchronised.
    """

    def __init__(self, encoder: Encoder, tokenizer: Tokenizer, pooling: list[str], normalize_embeddings: bool,
                 max_seq_length: int, do_lower_case: bool = False, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, include_prompt: bool = True):
        text = TextSide(tokenizer, encoder.config.max_sequence_length, max_seq_length, do_lower_case, prompts,
                        default_prompt_name, include_prompt)
        self.pipeline = EmbedPipeline(encoder, text, pooling, normalize_embeddings)

    @classmethod
    def from_pipeline(cls, pipeline: EmbedPipeline) -> "SentenceEncoder":
        self = cls.__new__(cls)
        self.pipeline = pipeline
        return self

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        max_seq_length: int | None = None, prompts: dict[str, str] | None = None,
                        default_prompt_name: str | None = None, task: str | None = None, *,
                        revision: str | None = None, token: str | None = None) -> "SentenceEncoder":
        """From a sentence-transformers directory (or a plain Hugging Face one: mean pooling), or its Hub ID
        (``org/name``; ``revision``, ``token``: see :func:`padfree.hub.resolve_model`).

        ``max_seq_length`` overrides ``sentence_bert_config.json`` (up to the model's position limit);
        ``prompts`` / ``default_prompt_name`` override those of ``config_sentence_transformers.json``
        (prompts are merged, the given ones win), as in sentence-transformers. ``task``: the LoRA adapter merged
        at load for a model with task adapters (jina-embeddings-v3; see :func:`padfree.from_pretrained`);
        ``encode(..., task=...)`` picks another per call.
        """
        path = resolve_model(path, revision, token)
        transformer_dir, modes, include_prompt, normalize_ = read_modules(path)
        encoder = from_pretrained(transformer_dir, dtype=dtype, device=device, backend=backend, task=task)
        text = TextSide.from_dir(transformer_dir, path, encoder.config.max_sequence_length, max_seq_length,
                                 prompts, default_prompt_name, include_prompt)
        return cls.from_pipeline(EmbedPipeline(encoder, text, modes, normalize_))

    # the pipeline's parts, as sentence-transformers names them
    encoder = property(lambda self: self.pipeline.encoder)
    tokenizer = property(lambda self: self.pipeline.text.tokenizer)
    pooling = property(lambda self: self.pipeline.pooling)
    dimension = property(lambda self: self.pipeline.dimension)
    do_lower_case = property(lambda self: self.pipeline.text.do_lower_case)
    prompts = property(lambda self: self.pipeline.text.prompts)
    default_prompt_name = property(lambda self: self.pipeline.text.default_prompt_name)
    include_prompt = property(lambda self: self.pipeline.text.include_prompt)

    @property
    def normalize_embeddings(self) -> bool:
        """Whether ``encode`` normalizes by default (the directory's Normalize module)."""
        return self.pipeline.normalizes

    @normalize_embeddings.setter
    def normalize_embeddings(self, value: bool) -> None:
        self.pipeline.normalizes = bool(value)

    @property
    def max_seq_length(self) -> int:
        """Texts are cut to this many tokens (special tokens included); may be set up to the model's position
        limit, as ``SentenceTransformer.max_seq_length`` can."""
        return self.pipeline.text.max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.pipeline.text.max_seq_length = value

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt text for ``encode``'s arguments, as sentence-transformers resolves it: ``prompt`` wins,
        then ``prompt_name``, then the default prompt name."""
        return self.pipeline.text.resolve_prompt(prompt, prompt_name)

    def tokenize(self, texts: Iterable[str], truncate: bool = True, prompt: str | None = None,
                 truncation_side: str | None = None) -> list[list[int]]:
        """Token ids with special tokens, one list per text (``prompt`` prepended to each); cut to
        ``max_seq_length`` on ``truncation_side`` (default: the tokenizer's), or ``ValueError`` for a too-long
        text if not ``truncate``."""
        return self.pipeline.text.tokenize(texts, truncate, prompt, truncation_side)

    def prompt_skip(self, prompt: str | None) -> int:
        """How many leading tokens pooling leaves out for texts encoded with ``prompt`` (0 unless the model
        was saved with ``include_prompt=False``)."""
        return self.pipeline.text.prompt_skip(prompt)

    def pooled(self, hidden: torch.Tensor, batch: PackedBatch, skip: int | torch.Tensor = 0) -> torch.Tensor:
        """The directory's pooling of a packed forward, not normalized: ``[T, H]`` -> ``[B, D]`` fp32."""
        return self.pipeline.pooled(hidden, batch, skip)

    def encode(self, texts: Iterable[str] | str, normalize_embeddings: bool | None = None,
               batch_tokens: int | None = None, truncate: bool = True, show_progress_bar: bool = False,
               batch_size: int | None = None, prompt_name: str | None = None, prompt: str | None = None,
               convert_to_numpy: bool = True, task: str | None = None) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32 numpy) in the order of ``texts``; one string gives ``[D]``.

        Texts (any iterable of strings) are taken in arrival order into batches of at most ``batch_tokens`` real
        tokens (default 8192 when neither limit is given; a text longer than the budget forms its own batch) and,
        when ``batch_size`` is given, at most that many texts. ``prompt`` / ``prompt_name`` as in
        sentence-transformers (default: the directory's ``default_prompt_name``). ``normalize_embeddings``
        defaults to the directory's Normalize module. ``convert_to_numpy`` is accepted for code written against
        sentence-transformers; the result is always numpy. ``task``: for a model with task LoRA adapters
        (jina-embeddings-v3), the adapter to run (None: the one chosen at load); each task's merged weights are
        built on its first use and kept (about one model's memory per task used, see
        :class:`padfree.lora.TaskAdapters`). The task does not choose a prompt: pass ``prompt_name`` for that.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else check_texts(texts)
        budget = check_budget(batch_tokens, batch_size)
        text_prompt = self.resolve_prompt(prompt, prompt_name)
        if len(texts) == 0:
            return np.empty((0, self.dimension), dtype=np.float32)
        seqs = self.pipeline.prepare(texts, truncate, prompt=text_prompt, adapter=task,
                                     normalize=normalize_embeddings)
        out = np.stack(self._run(seqs, budget, batch_size, show_progress_bar))
        return out[0] if single else out

    def _run(self, seqs, budget: int, batch_size: int | None, show_progress_bar: bool) -> list:
        """The pipeline's rows of ``seqs`` in token-budget batches of arrival order, with a progress bar."""
        if not show_progress_bar:
            return self.pipeline.run_all(seqs, budget, batch_size)
        from tqdm.auto import tqdm
        with tqdm(total=len(seqs), unit="text", desc="padfree encode") as bar:
            return self.pipeline.run_all(seqs, budget, batch_size, progress=bar.update)

    # ------------------------------------------------------------------ late chunking
    def encode_chunks(self, documents: Iterable[str], chunks: Sequence[Sequence[tuple[int, int]]] | None = None,
                      chunk_tokens: int | None = None, normalize_embeddings: bool | None = None,
                      batch_tokens: int | None = None, truncate: bool = True, prompt_name: str | None = None,
                      prompt: str | None = None, show_progress_bar: bool = False) -> list["Chunked"]:
        """Late chunking: each document is encoded once, whole, then its token states are pooled per chunk, so
        that every chunk's vector has seen the whole document. One :class:`Chunked` per document, in order:
        ``embeddings`` ``[n_chunks, D]`` float32 and ``spans``, the character span ``(start, end)`` each row
        covers.

        Give exactly one of:

        - ``chunks``: one list of character spans ``(start, end)`` per document, ``0 <= start < end <=
          len(document)`` (end excluded). A chunk's tokens run from the first to the last token that has a
          character in ``[start, end)`` (a token of characters ``[a, b)`` is in when ``max(a, start) < min(b,
          end)``): a token straddling two chunks is in both; spans may overlap or leave gaps. An empty list gives
          ``[0, D]``.
        - ``chunk_tokens=N``: consecutive windows of N of the document's tokens (the last may be shorter; a
          document without tokens, "", has none); ``spans`` are from the first token's first character to the
          last token's last.

        Special tokens ([CLS], [SEP]) and the prompt's tokens are in no chunk: they are context only. Each chunk
        is pooled with the directory's pooling (mean, max, mean_sqrt_len; several concatenated as in
        :meth:`encode`); a model that pools one token per text (cls, lasttoken) is refused with a
        ``ValueError``, since that token has no per-chunk meaning. ``normalize_embeddings``, ``prompt`` /
        ``prompt_name`` and ``batch_tokens`` (documents batched in arrival order) as in :meth:`encode`.

        Past ``max_seq_length``: with ``truncate`` (default) a document is cut as :meth:`encode` cuts it (on the
        tokenizer's truncation side); a chunk partly past the cut is pooled over its tokens before it, a chunk
        with no token before it is a ``ValueError`` naming it (never dropped: rows stay aligned with the given
        spans); ``chunk_tokens`` windows cover what the model read, as their ``spans`` show. Without
        ``truncate``, a document past the limit is a ``ValueError``. Bad spans (out of the document, empty,
        start > end), both or neither of ``chunks`` / ``chunk_tokens``: ``ValueError`` naming the problem.
        """
        budget = check_budget(batch_tokens, None)
        seqs = self.pipeline.prepare_chunks(documents, chunks, chunk_tokens, truncate,
                                            prompt=self.resolve_prompt(prompt, prompt_name),
                                            normalize=normalize_embeddings)
        rows = self._run(seqs, budget, None, show_progress_bar)
        return [Chunked(r, list(s.chunks.spans)) for r, s in zip(rows, seqs)]

    def chunk_layouts(self, documents: Iterable[str], chunks=None, chunk_tokens: int | None = None,
                      truncate: bool = True, prompt: str | None = None, truncation_side: str | None = None
                      ) -> tuple[list[list[int]], list[ChunkLayout]]:
        """Token ids of each document (``prompt`` prepended) and where its chunks lie, as
        :meth:`encode_chunks` defines them; ``ValueError`` naming the first bad argument, document or chunk."""
        return self.pipeline.chunk_layouts(documents, chunks, chunk_tokens, truncate, prompt, truncation_side)

    def pooled_chunks(self, hidden: torch.Tensor, batch: PackedBatch, layouts: Sequence[ChunkLayout | None]
                      ) -> list[torch.Tensor | None]:
        """The directory's pooling over each chunk of a packed forward, not normalized (see
        :meth:`padfree.pipelines.EmbedPipeline.pooled_chunks`)."""
        return self.pipeline.pooled_chunks(hidden, batch, layouts)


class Chunked(NamedTuple):
    """One document's late chunking (:meth:`SentenceEncoder.encode_chunks`)."""
    embeddings: np.ndarray
    """``[n_chunks, D]`` float32, one row per chunk."""
    spans: list[tuple[int, int]]
    """The character span ``(start, end)`` of the document each row covers (end excluded)."""
