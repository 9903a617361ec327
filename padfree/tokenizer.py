"""Tokenization on the ``tokenizers`` library alone: no ``transformers`` import on the inference path.

:class:`Tokenizer` reads a directory's ``tokenizer.json`` (the Rust fast tokenizer) and ``tokenizer_config.json``
(``model_max_length``, ``truncation_side``, BERT's ``do_lower_case`` / ``strip_accents`` /
``tokenize_chinese_chars``, which Hugging Face applies over the normalizer in ``tokenizer.json``). It gives
``tokenizers.Encoding`` objects (``ids``, ``type_ids``, ``offsets``, ``word_ids``) for texts or text pairs, with
truncation that keeps the special tokens.

Thread safety: a ``tokenizers.Tokenizer`` is mutated by ``enable_truncation`` / ``no_padding``; a concurrent
``encode`` then raises "Already borrowed" or runs under the other caller's settings. Here every Rust tokenizer is
configured once, when it is built (one per truncation length, cached under a lock), and only read afterwards,
so one :class:`Tokenizer` may be shared by any number of threads.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers

from ._hf import require_transformers

log = logging.getLogger("padfree")

TRUNCATION_SIDES = ("right", "left")
_BERT_NORMALIZER_KEYS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                         "tokenize_chinese_chars": "handle_chinese_chars"}
_HUGE = 10 ** 12  # transformers' "no limit" model_max_length is int(1e30)


class InputTooLong(ValueError):
    """An input has more tokens than the model's limit and truncation is off (HTTP 413 in the server)."""


def check_texts(texts, what: str = "text") -> list[str]:
    """``texts`` (any iterable) as a list of ``str``; ``ValueError`` naming the index and type of the first
    item that is not a string."""
    if isinstance(texts, (str, bytes)):
        raise ValueError(f"expected an iterable of {what}s, got a single {type(texts).__name__}")
    try:
        items = list(texts)
    except TypeError:
        raise ValueError(f"expected an iterable of {what}s, got {type(texts).__name__}") from None
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise ValueError(f"{what} {i} is not a string: {type(t).__name__} {_short(t)}")
    return items


def _short(x, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def _unencodable(texts: Sequence[str], what: str) -> ValueError | None:
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            return ValueError(f"{what} {i} cannot be encoded as UTF-8 ({e.reason} at character {e.start}: "
                              f"{t[e.start]!r}): {_short(t)}")
    return None


class Tokenizer:
    """A fast tokenizer configured once; safe to share across threads.

    ``model_max_length``: the tokenizer's own limit (None when it declares none); ``truncation_side``:
    "right" (cut the end) or "left" (cut the start), as in Hugging Face; ``special_ids``: ids of every special
    token (added tokens marked special). Rust tokenizers are built on first use, one per truncation length.
    """

    def __init__(self, spec: str, *, model_max_length: int | None = None, truncation_side: str = "right",
                 name: str = "tokenizer"):
        if truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}; got {truncation_side!r}")
        self.name = name
        self.model_max_length = model_max_length if model_max_length and model_max_length < _HUGE else None
        self.truncation_side = truncation_side
        self._spec = spec
        self._lock = threading.Lock()
        # by (truncation length, side); (None, "right"): no truncation
        self._tokenizers: dict[tuple[int | None, str], tokenizers.Tokenizer] = {}
        self._special_ids: frozenset[int] | None = None

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (added tokens marked special)."""
        if self._special_ids is None:
            decoder = self._for_length(None).get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in decoder.items() if t.special)
        return self._special_ids

    def _build(self, max_length: int | None, side: str) -> tokenizers.Tokenizer:
        tok = tokenizers.Tokenizer.from_str(self._spec)
        tok.no_padding()
        if max_length is None:
            tok.no_truncation()
        else:
            tok.enable_truncation(max_length, strategy="longest_first", direction=side)
        return tok  # never reconfigured after this point

    def _for_length(self, max_length: int | None, side: str | None = None) -> tokenizers.Tokenizer:
        key = (max_length, side or self.truncation_side) if max_length is not None else (None, "right")
        tok = self._tokenizers.get(key)
        if tok is None:
            with self._lock:
                tok = self._tokenizers.get(key)
                if tok is None:
                    tok = self._tokenizers[key] = self._build(*key)
        return tok

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_pretrained(cls, path) -> "Tokenizer":
        """From a directory with ``tokenizer.json`` (and optionally ``tokenizer_config.json``).

        A directory with only slow-tokenizer files (``vocab.txt``, ``sentencepiece.bpe.model``, ...) is converted
        once through ``transformers`` (imported only then; ``ImportError`` naming the ``hf`` extra where it is not
        installed); ``ValueError`` if it has no tokenizer files at all.
        """
        path = Path(path)
        conf_file = path / "tokenizer_config.json"
        conf = json.loads(conf_file.read_text(encoding="utf-8")) if conf_file.is_file() else {}
        if not (path / "tokenizer.json").is_file():
            if not any(path.glob("vocab.*")) and not any(path.glob("*.model")) and not conf_file.is_file():
                raise ValueError(f"{path} has no tokenizer: expected tokenizer.json")
            log.info("padfree: %s has no tokenizer.json; converting its tokenizer through transformers", path)
            transformers = require_transformers(f"converting the slow tokenizer of {path} (it has no tokenizer.json)")
            return cls.from_transformers(transformers.AutoTokenizer.from_pretrained(str(path)))
        text = (path / "tokenizer.json").read_text(encoding="utf-8")
        spec = json.loads(text)
        if _apply_bert_options(spec, conf):  # re-serialise only when the config changed something (~10 ms)
            text = json.dumps(spec)
        return cls(text, model_max_length=conf.get("model_max_length"),
                   truncation_side=conf.get("truncation_side", "right"), name=str(path))

    @classmethod
    def from_transformers(cls, hf_tokenizer) -> "Tokenizer":
        """From an in-memory ``transformers`` fast tokenizer (its backend, limit and truncation side)."""
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer (no backend_tokenizer); "
                             "padfree needs one")
        return cls(backend.to_str(), model_max_length=getattr(hf_tokenizer, "model_max_length", None),
                   truncation_side=getattr(hf_tokenizer, "truncation_side", "right"),
                   name=getattr(hf_tokenizer, "name_or_path", "") or type(hf_tokenizer).__name__)

    @classmethod
    def coerce(cls, tokenizer) -> "Tokenizer | None":
        """A padfree Tokenizer from one, from a ``tokenizers.Tokenizer`` (copied: the caller's object is never
        reconfigured), from a transformers fast tokenizer, or None."""
        if tokenizer is None or isinstance(tokenizer, cls):
            return tokenizer
        if isinstance(tokenizer, tokenizers.Tokenizer):
            return cls(tokenizer.to_str())
        return cls.from_transformers(tokenizer)

    # ------------------------------------------------------------------ encoding
    def encode(self, texts: Iterable[str], pairs: Iterable[str] | None = None, *, max_length: int | None = None,
               add_special_tokens: bool = True, truncation_side: str | None = None) -> list[tokenizers.Encoding]:
        """One ``tokenizers.Encoding`` per text (or pair), unpadded. ``max_length``: truncate to that many tokens,
        special tokens included and kept (longest-first across a pair, on ``truncation_side``, by default the
        tokenizer's); None: no truncation. ``ValueError`` naming the index of a text that is not a string or not
        encodable."""
        texts = check_texts(texts)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1; got {max_length}")
        if truncation_side is not None and truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}; got {truncation_side!r}")
        tok = self._for_length(max_length, truncation_side)
        if pairs is None:
            inputs = texts
        else:
            pairs = check_texts(pairs, "pair text")
            if len(pairs) != len(texts):
                raise ValueError(f"got {len(texts)} texts and {len(pairs)} pair texts; they must match")
            inputs = list(zip(texts, pairs))
        try:
            return tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:  # the Rust side names neither the text nor its index
            bad = _unencodable(texts, "text") or (pairs is not None and _unencodable(pairs, "pair text"))
            if bad:
                raise bad from None
            if max_length is not None and "truncat" in str(e).lower():
                raise ValueError(f"cannot truncate to max_length={max_length}: {e}") from None
            raise

    def __call__(self, texts, pairs=None, *, max_length=None):
        return self.encode(texts, pairs, max_length=max_length)

    def num_special_tokens(self, pair: bool = False) -> int:
        """How many special tokens the post-processor adds to one text (or a pair)."""
        return self._for_length(None).num_special_tokens_to_add(pair)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, model_max_length={self.model_max_length}, "
                f"truncation_side={self.truncation_side!r})")


def _apply_bert_options(spec: dict, conf: dict) -> bool:
    """Hugging Face's BERT-style tokenizers rebuild their ``BertNormalizer`` from ``tokenizer_config.json``
    (``do_lower_case`` etc.), overriding ``tokenizer.json``; do the same where the config says so. True if
    ``spec`` changed."""
    norm = spec.get("normalizer")
    targets = [norm] if isinstance(norm, dict) else []
    if isinstance(norm, dict) and norm.get("type") == "Sequence":
        targets = norm.get("normalizers", [])
    changed = False
    for n in targets:
        if n.get("type") != "BertNormalizer":
            continue
        for key, field in _BERT_NORMALIZER_KEYS.items():
            if key in conf and n.get(field) != conf[key]:
                n[field] = conf[key]
                changed = True
    return changed
