"""SentenceEncoder: a sentence-transformers directory run padding-free.

Reads ``modules.json`` (Transformer -> Pooling -> optional Normalize), ``config_sentence_transformers.json``
(prompts), tokenizes with the directory's ``tokenizer.json`` through :mod:`padfree.tokenizer` (no
``transformers`` import), batches texts in arrival order by a budget of real tokens (and optionally a count of
texts), and returns embeddings in input order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .loading import from_pretrained
from .models.encoder import Encoder
from .pooling import normalize, pool
from .tokenizer import Tokenizer, check_texts

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
                        default_prompt_name: str | None = None) -> "SentenceEncoder":
        """From a sentence-transformers directory (or a plain Hugging Face one: mean pooling).

        ``max_seq_length`` overrides ``sentence_bert_config.json`` (up to the model's position limit);
        ``prompts`` / ``default_prompt_name`` override those of ``config_sentence_transformers.json``
        (prompts are merged, the given ones win), as in sentence-transformers.
        """
        path = Path(path)
        transformer_dir, modes, include_prompt, normalize_ = _read_modules(path)
        encoder = from_pretrained(transformer_dir, dtype=dtype, device=device, backend=backend)
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
        texts = check_texts(texts)
        if prompt:
            texts = [prompt + t for t in texts]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        limit = self.max_seq_length
        encodings = self.tokenizer.encode(texts, max_length=limit if truncate else None,
                                          truncation_side=truncation_side)
        ids = [e.ids for e in encodings]
        if not truncate:
            for i, s in enumerate(ids):
                if len(s) > limit:
                    raise ValueError(f"text {i} has {len(s)} tokens, more than the limit of {limit}; "
                                     "truncate to cut it")
        return ids

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
               convert_to_numpy: bool = True) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32 numpy) in the order of ``texts``; one string gives ``[D]``.

        Texts (any iterable of strings) are taken in arrival order into batches of at most ``batch_tokens`` real
        tokens (default 8192 when neither limit is given; a text longer than the budget forms its own batch) and,
        when ``batch_size`` is given, at most that many texts. ``prompt`` / ``prompt_name`` as in
        sentence-transformers (default: the directory's ``default_prompt_name``). ``normalize_embeddings``
        defaults to the directory's Normalize module. ``convert_to_numpy`` is accepted for code written against
        sentence-transformers; the result is always numpy.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else check_texts(texts)
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS if batch_size is None else 1 << 62
        token_budget_batches([], batch_tokens, batch_size)  # checks both limits before any work (also for no texts)
        norm = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        text_prompt = self.resolve_prompt(prompt, prompt_name)
        skip = self.prompt_skip(text_prompt)
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if len(texts) == 0:
            return out
        ids = self.tokenize(texts, truncate, text_prompt)
        batches = token_budget_batches([len(s) for s in ids], batch_tokens, batch_size)
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(texts), unit="text", desc="padfree encode")
        for start, end in batches:
            # inside a batch, sequences go by length: equal lengths then sit side by side, and attention runs
            # once per distinct length on a view, with no gather (the batches themselves keep arrival order)
            order = sorted(range(start, end), key=lambda i: len(ids[i]))
            batch = PackedBatch.from_sequences([ids[i] for i in order], device=self.encoder.device)
            emb = self.pooled(self.encoder.forward_packed(batch), batch, skip)
            if norm:
                emb = normalize(emb)
            out[order] = emb.cpu().numpy()
            if bar is not None:
                bar.update(end - start)
        if bar is not None:
            bar.close()
        return out[0] if single else out


def _without_prefix(hidden: torch.Tensor, batch: PackedBatch, skip: int | torch.Tensor
                    ) -> tuple[torch.Tensor, PackedBatch]:
    """The hidden states and batch without the first ``skip`` tokens of each sequence (the prompt, for
    ``include_prompt=False``; one count, or ``[B]`` counts); a sequence no longer than its prompt keeps its last
    token."""
    lengths = batch.seqlens
    cut = torch.minimum(lengths - 1, torch.as_tensor(skip, device=lengths.device))  # [B]
    keep = batch.position_ids >= cut.repeat_interleave(lengths, output_size=batch.num_tokens)
    new_lengths = (lengths - cut).tolist()
    sub = PackedBatch.from_sequences([[0] * n for n in new_lengths], device=hidden.device)
    return hidden[keep], sub


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
