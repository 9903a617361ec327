"""SentenceEncoder: a sentence-transformers directory run padding-free.

Reads ``modules.json`` (Transformer -> Pooling -> optional Normalize), ``config_sentence_transformers.json``
(prompts), tokenizes with the directory's ``tokenizer.json`` through :mod:`padfree.tokenizer` (no
``transformers`` import), batches texts in arrival order by a budget of real tokens (and optionally a count of
texts), and returns embeddings in input order.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .loading import from_pretrained
from .models.encoder import Encoder
from .pooling import normalize, pool
from .tokenizer import InputTooLong, Tokenizer, check_texts

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
DEFAULT_BATCH_TOKENS = 8192
_PROMPT_CACHE = 1024  # prompt texts whose token counts are kept


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


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


def _read_modules(path: Path) -> tuple[Path, list[str], bool, bool]:
    """(transformer dir, pooling modes in sentence-transformers' concatenation order, include_prompt,
    normalize?)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():  # a plain Hugging Face model: mean pooling, like sentence-transformers does
        return path, ["mean"], True, False
    modules = json.loads(modules_file.read_text())
    transformer_dir, modes, include_prompt, normalize_ = path, ["mean"], True, False
    for m in modules:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Transformer":
            transformer_dir = path / m.get("path", "")
        elif kind == "Pooling":
            modes, include_prompt = _pooling(_read_json(path / m["path"] / "config.json"))
        elif kind == "Normalize":
            normalize_ = True
        else:
            raise ValueError(f"unsupported sentence-transformers module {m['type']!r}; padfree supports "
                             "Transformer, Pooling and Normalize")
    return transformer_dir, modes, include_prompt, normalize_


class SentenceEncoder:
    """Text in, embeddings out: ``encode(texts) -> numpy [N, D]`` (``[D]`` for a single string).

    One instance may be shared by threads: encoding mutates nothing on it (the tokenizer is configured once per
    truncation length, see :mod:`padfree.tokenizer`). Setting ``max_seq_length`` or ``prompts`` while other
    threads encode is not synchronised.
    """

    def __init__(self, encoder: Encoder, tokenizer: Tokenizer, pooling: list[str], normalize_embeddings: bool,
                 max_seq_length: int, do_lower_case: bool = False, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, include_prompt: bool = True):
        self.encoder = encoder
        self.tokenizer = Tokenizer.coerce(tokenizer)
        self.pooling = pooling
        self.normalize_embeddings = normalize_embeddings
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.include_prompt = include_prompt
        self._prompt_lengths: dict[str, int] = {}

    @property
    def max_seq_length(self) -> int:
        """Texts are cut to this many tokens (special tokens included); may be set up to the model's position
        limit, as ``SentenceTransformer.max_seq_length`` can."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        limit = self.encoder.config.max_sequence_length
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ValueError(f"max_seq_length must be an int in [1, {limit}] (the model's position limit); "
                             f"got {value!r}")
        self._max_seq_length = value

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        max_seq_length: int | None = None, prompts: dict[str, str] | None = None,
                        default_prompt_name: str | None = None, task: str | None = None) -> "SentenceEncoder":
        """From a sentence-transformers directory (or a plain Hugging Face one: mean pooling).

        ``max_seq_length`` overrides ``sentence_bert_config.json`` (up to the model's position limit);
        ``prompts`` / ``default_prompt_name`` override those of ``config_sentence_transformers.json``
        (prompts are merged, the given ones win), as in sentence-transformers. ``task``: the LoRA adapter merged
        at load for a model with task adapters (jina-embeddings-v3; see :func:`padfree.from_pretrained`);
        ``encode(..., task=...)`` picks another per call.
        """
        path = Path(path)
        transformer_dir, modes, include_prompt, normalize_ = _read_modules(path)
        encoder = from_pretrained(transformer_dir, dtype=dtype, device=device, backend=backend, task=task)
        st_conf = _read_json(transformer_dir / "sentence_bert_config.json")
        tokenizer = Tokenizer.from_pretrained(transformer_dir)
        if max_seq_length is None:  # as sentence-transformers: its config, else the tokenizer's limit, capped
            max_seq_length = st_conf.get("max_seq_length") or min(
                x for x in (tokenizer.model_max_length, encoder.config.max_sequence_length) if x)
        model_conf = _read_json(path / "config_sentence_transformers.json")
        all_prompts = {k: v or "" for k, v in (model_conf.get("prompts") or {}).items()}
        all_prompts.update(prompts or {})
        default = default_prompt_name if default_prompt_name is not None else model_conf.get("default_prompt_name")
        return cls(encoder, tokenizer, modes, normalize_, int(max_seq_length),
                   bool(st_conf.get("do_lower_case", False)), all_prompts, default or None, include_prompt)

    @property
    def dimension(self) -> int:
        return self.encoder.config.hidden_size * len(self.pooling)

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt text for ``encode``'s arguments, as sentence-transformers resolves it: ``prompt`` wins,
        then ``prompt_name``, then the default prompt name."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt must be a string; got {type(prompt).__name__}")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of the prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        if self.default_prompt_name is not None:
            return self.prompts.get(self.default_prompt_name)
        return None

    def _prompt_length(self, prompt: str) -> int:
        """Tokens of the prompt alone, with its leading special tokens and without a trailing special token
        (sentence-transformers' count of the positions that ``include_prompt=False`` leaves out of pooling)."""
        n = self._prompt_lengths.get(prompt)
        if n is None:
            ids = self.tokenizer.encode([prompt.lower() if self.do_lower_case else prompt],
                                        max_length=self.max_seq_length)[0].ids
            n = len(ids) - (1 if ids and ids[-1] in self.tokenizer.special_ids else 0)
            if len(self._prompt_lengths) >= _PROMPT_CACHE:  # free-form prompts must not grow it without bound
                self._prompt_lengths.clear()
            self._prompt_lengths[prompt] = n
        return n

    def tokenize(self, texts: Iterable[str], truncate: bool = True, prompt: str | None = None,
                 truncation_side: str | None = None) -> list[list[int]]:
        """Token ids with special tokens, one list per text (``prompt`` prepended to each); cut to
        ``max_seq_length`` on ``truncation_side`` (default: the tokenizer's), or ``ValueError`` for a too-long
        text if not ``truncate``. Texts are not stripped (sentence-transformers 6 does not strip either)."""
        return [e.ids for e in self._encodings(check_texts(texts), truncate, prompt, truncation_side)]

    def _encodings(self, texts: list[str], truncate: bool, prompt: str | None, truncation_side: str | None):
        """``tokenize``'s ``tokenizers.Encoding`` objects (ids and character offsets into prompt + text)."""
        if prompt:
            texts = [prompt + t for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        limit = self.max_seq_length
        encodings = self.tokenizer.encode(texts, max_length=limit if truncate else None,
                                          truncation_side=truncation_side)
        if not truncate:
            for i, e in enumerate(encodings):
                if len(e.ids) > limit:
                    raise InputTooLong(f"text {i} has {len(e.ids)} tokens, more than the limit of {limit}; "
                                     "truncate to cut it")
        return encodings

    def prompt_skip(self, prompt: str | None) -> int:
        """How many leading tokens pooling leaves out for texts encoded with ``prompt`` (0 unless the model
        was saved with ``include_prompt=False``)."""
        return self._prompt_length(prompt) if prompt and not self.include_prompt else 0

    def pooled(self, hidden: torch.Tensor, batch: PackedBatch, skip: int | torch.Tensor = 0) -> torch.Tensor:
        """The directory's pooling of a packed forward, not normalized: ``[T, H]`` -> ``[B, D]`` fp32.
        ``skip``: leading tokens (the prompt) to leave out, one count for all sequences or one per sequence."""
        if not isinstance(skip, int) or skip:
            hidden, batch = _without_prefix(hidden, batch, skip)
        return torch.cat([pool(hidden, batch, m) for m in self.pooling], dim=-1)

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
        encoder = self.encoder.for_task(task) if task is not None else self.encoder
        single = isinstance(texts, str)
        texts = [texts] if single else check_texts(texts)
        batch_tokens = _budget(batch_tokens, batch_size)
        norm = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        text_prompt = self.resolve_prompt(prompt, prompt_name)
        skip = self.prompt_skip(text_prompt)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if len(texts) == 0:
            return out
        ids = self.tokenize(texts, truncate, text_prompt)
        for order, hidden, batch in self._forward(ids, batch_tokens, batch_size, show_progress_bar, encoder):
            emb = self.pooled(hidden, batch, skip)
            if norm:
                emb = normalize(emb)
            out[order] = emb.cpu().numpy()
        return out[0] if single else out

    def _forward(self, ids: list[list[int]], batch_tokens: int, batch_size: int | None = None,
                 show_progress_bar: bool = False, encoder: Encoder | None = None):
        """Token-budget batches of ``ids`` in arrival order, one packed forward each: yields
        ``(order, hidden [T, H], batch)``, ``order`` the indices into ``ids`` of the batch's sequences."""
        encoder = encoder or self.encoder
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), unit="text", desc="padfree encode")
        try:
            for start, end in token_budget_batches([len(s) for s in ids], batch_tokens, batch_size):
                # inside a batch, sequences go by length: equal lengths then sit side by side, and attention runs
                # once per distinct length on a view, with no gather (the batches themselves keep arrival order)
                order = sorted(range(start, end), key=lambda i: len(ids[i]))
                batch = PackedBatch.from_sequences([ids[i] for i in order], device=encoder.device)
                yield order, encoder.forward_packed(batch), batch
                if bar is not None:
                    bar.update(end - start)
        finally:
            if bar is not None:
                bar.close()

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
        batch_tokens = _budget(batch_tokens, None)
        norm = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        ids, layouts = self.chunk_layouts(documents, chunks, chunk_tokens, truncate,
                                          self.resolve_prompt(prompt, prompt_name))
        out: list = [None] * len(ids)
        for order, hidden, batch in self._forward(ids, batch_tokens, None, show_progress_bar):
            for i, emb in zip(order, self.pooled_chunks(hidden, batch, [layouts[i] for i in order])):
                out[i] = Chunked((normalize(emb) if norm else emb).cpu().numpy(), list(layouts[i].spans))
        return out

    def chunk_layouts(self, documents: Iterable[str], chunks=None, chunk_tokens: int | None = None,
                      truncate: bool = True, prompt: str | None = None, truncation_side: str | None = None
                      ) -> tuple[list[list[int]], list["ChunkLayout"]]:
        """Token ids of each document (``prompt`` prepended) and where its chunks lie, as
        :meth:`encode_chunks` defines them; ``ValueError`` naming the first bad argument, document or chunk."""
        documents = check_texts(documents, "document")
        per_text = [m for m in self.pooling if m in ("cls", "lasttoken")]
        if per_text:
            raise ValueError(f"late chunking pools the tokens of each chunk; this model pools with {per_text[0]!r} "
                             "(one token per text), which has no per-chunk meaning")
        if (chunks is None) == (chunk_tokens is None):
            raise ValueError("give either chunks (character spans per document) or chunk_tokens (a window size in "
                             "tokens)" + (", not both" if chunks is not None else ""))
        if chunk_tokens is not None:
            _positive_int("chunk_tokens", chunk_tokens)
        else:
            chunks = _check_spans(documents, chunks)
        encodings = self._encodings(documents, truncate, prompt, truncation_side)
        prompt = prompt or ""
        layouts = []
        for i, (doc, e) in enumerate(zip(documents, encodings)):
            offsets = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            text = prompt + doc
            if self.do_lower_case and len(text.lower()) != len(text):  # offsets are in the lowered text
                offsets = np.repeat(np.arange(len(text) + 1), [len(c.lower()) for c in text] + [1])[offsets]
            layouts.append(_layout(offsets - len(prompt), None if chunks is None else chunks[i], chunk_tokens,
                                   bool(e.overflowing), i, self.max_seq_length))
        return [e.ids for e in encodings], layouts

    def pooled_chunks(self, hidden: torch.Tensor, batch: PackedBatch, layouts: Sequence["ChunkLayout | None"]
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
            pooled = torch.zeros(0, self.dimension, device=hidden.device)
        else:
            sizes = np.asarray(sizes, dtype=np.int64)
            index = np.repeat(np.asarray(firsts, dtype=np.int64) - (np.cumsum(sizes) - sizes), sizes) \
                + np.arange(sizes.sum())
            pooled = self.pooled(hidden[torch.from_numpy(index).to(hidden.device)],
                                 _segments(sizes.tolist(), hidden.device))
        return [p if layout is not None else None for p, layout in zip(pooled.split(counts), layouts)]


class Chunked(NamedTuple):
    """One document's late chunking (:meth:`SentenceEncoder.encode_chunks`)."""
    embeddings: np.ndarray
    """``[n_chunks, D]`` float32, one row per chunk."""
    spans: list[tuple[int, int]]
    """The character span ``(start, end)`` of the document each row covers (end excluded)."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where a document's chunks lie in its tokenized sequence."""
    tokens: tuple[tuple[int, int], ...]
    """``[first, end)`` token positions of each chunk in the sequence (special tokens included in the count)."""
    spans: tuple[tuple[int, int], ...]
    """The character span ``(start, end)`` of the document each chunk stands for."""


def _check_spans(documents: list[str], chunks) -> list[list[tuple[int, int]]]:
    """``chunks`` as one list of ``(start, end)`` int pairs per document, each inside its document and not
    empty; ``ValueError`` naming the first that is not."""
    try:
        chunks = [list(c) for c in chunks]
    except TypeError:
        raise ValueError("chunks must be one list of (start, end) character spans per document") from None
    if len(chunks) != len(documents):
        raise ValueError(f"chunks has {len(chunks)} lists of spans for {len(documents)} documents; give one list "
                         "per document")
    out = []
    for i, (doc, spans) in enumerate(zip(documents, chunks)):
        checked = []
        for j, span in enumerate(spans):
            if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(
                    isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in span)):
                raise ValueError(f"document {i} chunk {j}: a span is a pair (start, end) of ints; got {span!r:.40}")
            s, e = int(span[0]), int(span[1])
            if s > e:
                raise ValueError(f"document {i} chunk {j}: start {s} > end {e}")
            if s == e:
                raise ValueError(f"document {i} chunk {j} is empty: start == end == {s}")
            if s < 0 or e > len(doc):
                raise ValueError(f"document {i} chunk {j} ({s}, {e}) is out of range: the document has {len(doc)} "
                                 f"characters, spans lie within [0, {len(doc)}]")
            checked.append((s, e))
        out.append(checked)
    return out


def _layout(offsets: np.ndarray, spans: list[tuple[int, int]] | None, chunk_tokens: int | None, truncated: bool,
            doc: int, limit: int) -> ChunkLayout:
    """A document's :class:`ChunkLayout` from its tokens' character offsets ``[n, 2]`` in the document (negative:
    in the prompt; special tokens have none) and either its ``spans`` or ``chunk_tokens``."""
    starts, ends = np.maximum(offsets[:, 0], 0), offsets[:, 1]
    tokens = np.flatnonzero(ends > starts)  # those with a character of the document: no special or prompt token
    starts, ends = starts[tokens], ends[tokens]
    if chunk_tokens is not None:
        firsts = range(0, len(tokens), chunk_tokens)
        lasts = [min(f + chunk_tokens, len(tokens)) - 1 for f in firsts]
        return ChunkLayout(tuple((int(tokens[f]), int(tokens[k]) + 1) for f, k in zip(firsts, lasts)),
                           tuple((int(starts[f]), int(ends[k])) for f, k in zip(firsts, lasts)))
    ranges = []
    for j, (s, e) in enumerate(spans):
        inside = np.flatnonzero(np.maximum(starts, s) < np.minimum(ends, e))
        if len(inside):
            ranges.append((int(tokens[inside[0]]), int(tokens[inside[-1]]) + 1))
        elif truncated and (not len(tokens) or s >= ends[-1] or e <= starts[0]):
            read = f"characters {starts[0]}..{ends[-1]}" if len(tokens) else "none of its characters"
            raise ValueError(f"document {doc} chunk {j} ({s}, {e}) lies past the model's limit of {limit} tokens: "
                             f"the model reads {read} of the document (split the document, or use a longer "
                             "max_seq_length)")
        else:
            raise ValueError(f"document {doc} chunk {j} ({s}, {e}) covers no token (the tokenizer keeps none of "
                             "its characters, e.g. only whitespace)")
    return ChunkLayout(tuple(ranges), tuple(spans))


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


def _budget(batch_tokens: int | None, batch_size: int | None) -> int:
    """The token budget of ``encode``'s arguments (8192 when neither limit is given), both limits checked before
    any work."""
    if batch_tokens is None:
        batch_tokens = DEFAULT_BATCH_TOKENS if batch_size is None else 1 << 62
    token_budget_batches([], batch_tokens, batch_size)
    return batch_tokens


def _positive_int(name: str, value, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{what}; got {value!r}")


def token_budget_batches(lengths: Sequence[int], budget: int, max_items: int | None = None) -> list[tuple[int, int]]:
    """``(start, end)`` ranges of consecutive items whose lengths sum to at most ``budget`` and, if ``max_items`` is
    given, that hold at most that many items (an item longer than the budget alone forms a batch). ``ValueError``
    for a budget or count that is not a positive int (every batching call of padfree comes through here)."""
    _positive_int("batch_tokens", budget)
    if max_items is not None:
        _positive_int("batch_size", max_items, " (a count of texts)")
    out, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used and (used + n > budget or (max_items is not None and i - start >= max_items)):
            out.append((start, i))
            start, used = i, 0
        used += n
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out
