"""The text side of a pipeline: tokenizer, prompts, the length limit and its truncation, and where late chunking's
chunks lie in a tokenized document. Every pipeline that reads text (embeddings, sparse vectors) tokenizes here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .batching import positive_int
from .directory import read_json
from .tokenizer import InputTooLong, Tokenizer, check_texts

_PROMPT_CACHE = 1024  # prompt texts whose token counts are kept


@dataclass(frozen=True)
class ChunkLayout:
    """Where a document's chunks lie in its tokenized sequence."""
    tokens: tuple[tuple[int, int], ...]
    """``[first, end)`` token positions of each chunk in the sequence (special tokens included in the count)."""
    spans: tuple[tuple[int, int], ...]
    """The character span ``(start, end)`` of the document each chunk stands for."""


class TextSide:
    """Texts -> token ids, as sentence-transformers makes them: the prompt prepended, lower-cased where the model
    says so, cut to ``max_seq_length`` (or refused). Shared by threads: tokenizing mutates nothing but a cache of
    prompt lengths."""

    def __init__(self, tokenizer, limit: int, max_seq_length: int, do_lower_case: bool = False,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                 include_prompt: bool = True):
        self.tokenizer = Tokenizer.coerce(tokenizer)
        self.limit = limit  # the model's position limit
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case
        self.prompts = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"{sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.include_prompt = include_prompt
        self._prompt_lengths: dict[str, int] = {}

    @classmethod
    def from_dir(cls, model_dir: Path, root: Path, limit: int, max_seq_length: int | None = None,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                 include_prompt: bool = True) -> "TextSide":
        """From a checkpoint's folder (``tokenizer.json``, ``sentence_bert_config.json``) and its
        sentence-transformers root (``config_sentence_transformers.json``: prompts). ``max_seq_length``: as
        sentence-transformers, the given one, else the config's, else the tokenizer's limit capped by ``limit``;
        given ``prompts`` are merged over the directory's."""
        tokenizer = Tokenizer.from_pretrained(model_dir)
        st_conf = read_json(model_dir / "sentence_bert_config.json")
        if max_seq_length is None:
            max_seq_length = st_conf.get("max_seq_length") or min(
                x for x in (tokenizer.model_max_length, limit) if x)
        model_conf = read_json(root / "config_sentence_transformers.json")
        all_prompts = {k: v or "" for k, v in (model_conf.get("prompts") or {}).items()}
        all_prompts.update(prompts or {})
        default = default_prompt_name if default_prompt_name is not None else model_conf.get("default_prompt_name")
        return cls(tokenizer, limit, int(max_seq_length), bool(st_conf.get("do_lower_case", False)), all_prompts,
                   default or None, include_prompt)

    @property
    def max_seq_length(self) -> int:
        """Texts are cut to this many tokens (special tokens included), at most the model's position limit."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= self.limit:
            raise ValueError(f"max_seq_length must be an int in [1, {self.limit}] (the model's position limit); "
                             f"got {value!r}")
        self._max_seq_length = value

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The prompt text, as sentence-transformers resolves it: ``prompt`` wins, then ``prompt_name``, then the
        default prompt name."""
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

    def prompt_skip(self, prompt: str | None) -> int:
        """How many leading tokens pooling leaves out for texts encoded with ``prompt`` (0 unless the model was
        saved with ``include_prompt=False``): the prompt's tokens with its leading special tokens, without a
        trailing special token (sentence-transformers' count)."""
        if not prompt or self.include_prompt:
            return 0
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
        ``max_seq_length`` on ``truncation_side`` (default: the tokenizer's), or ``InputTooLong`` (a
        ``ValueError``) for a too-long text if not ``truncate``. Texts are not stripped (sentence-transformers 6
        does not strip either)."""
        return [e.ids for e in self.encodings(check_texts(texts), truncate, prompt, truncation_side)]

    def encodings(self, texts: list[str], truncate: bool, prompt: str | None, truncation_side: str | None):
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

    def chunk_layouts(self, documents: Iterable[str], chunks=None, chunk_tokens: int | None = None,
                      truncate: bool = True, prompt: str | None = None, truncation_side: str | None = None
                      ) -> tuple[list[list[int]], list[ChunkLayout]]:
        """Token ids of each document (``prompt`` prepended) and where its chunks lie (late chunking: see
        :meth:`padfree.SentenceEncoder.encode_chunks`); ``ValueError`` naming the first bad argument, document or
        chunk."""
        documents = check_texts(documents, "document")
        if (chunks is None) == (chunk_tokens is None):
            raise ValueError("give either chunks (character spans per document) or chunk_tokens (a window size in "
                             "tokens)" + (", not both" if chunks is not None else ""))
        if chunk_tokens is not None:
            positive_int("chunk_tokens", chunk_tokens)
        else:
            chunks = _check_spans(documents, chunks)
        encodings = self.encodings(documents, truncate, prompt, truncation_side)
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
