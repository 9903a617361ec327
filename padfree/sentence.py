"""SentenceEncoder: a sentence-transformers directory run padding-free.

Reads ``modules.json`` (Transformer -> Pooling -> optional Normalize), tokenizes with the directory's fast
tokenizer, batches texts in arrival order by a budget of real tokens, and returns embeddings in input order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .batch import PackedBatch
from .loading import from_pretrained
from .models.encoder import Encoder
from .pooling import normalize, pool

_POOLING_KEYS = {  # sentence-transformers pooling config flag -> padfree mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


def _read_modules(path: Path) -> tuple[Path, list[str], bool]:
    """(transformer dir, pooling modes in sentence-transformers' concatenation order, normalize?)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():  # a plain Hugging Face model: mean pooling, like sentence-transformers does
        return path, ["mean"], False
    modules = json.loads(modules_file.read_text())
    transformer_dir, modes, normalize_ = path, ["mean"], False
    for m in modules:
        kind = m["type"].rsplit(".", 1)[-1]
        if kind == "Transformer":
            transformer_dir = path / m.get("path", "")
        elif kind == "Pooling":
            conf = json.loads((path / m["path"] / "config.json").read_text())
            modes = [mode for key, mode in _POOLING_KEYS.items() if conf.get(key)]
            unknown = [k for k, v in conf.items() if k.startswith("pooling_mode") and v and k not in _POOLING_KEYS]
            if unknown or not modes:
                raise ValueError(f"unsupported pooling configuration {conf}")
        elif kind == "Normalize":
            normalize_ = True
        else:
            raise ValueError(f"unsupported sentence-transformers module {m['type']!r}; padfree supports "
                             "Transformer, Pooling and Normalize")
    return transformer_dir, modes, normalize_


class SentenceEncoder:
    """Text in, embeddings out: ``encode(texts) -> numpy [N, D]``."""

    def __init__(self, encoder: Encoder, tokenizer, pooling: list[str], normalize_embeddings: bool,
                 max_seq_length: int, do_lower_case: bool = False):
        self.encoder = encoder
        self.tokenizer = tokenizer          # a `tokenizers.Tokenizer` (fast, Rust)
        self.pooling = pooling
        self.normalize_embeddings = normalize_embeddings
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        max_seq_length: int | None = None) -> "SentenceEncoder":
        from transformers import AutoTokenizer
        path = Path(path)
        transformer_dir, modes, normalize_ = _read_modules(path)
        encoder = from_pretrained(transformer_dir, dtype=dtype, device=device, backend=backend)
        st_conf_file = transformer_dir / "sentence_bert_config.json"
        st_conf = json.loads(st_conf_file.read_text()) if st_conf_file.is_file() else {}
        hf_tok = AutoTokenizer.from_pretrained(str(transformer_dir))
        if not hf_tok.is_fast:
            raise ValueError(f"{transformer_dir} has no fast tokenizer (tokenizer.json); padfree needs one")
        limit = min(x for x in (max_seq_length, st_conf.get("max_seq_length"), hf_tok.model_max_length,
                                encoder.config.max_sequence_length) if x)
        return cls(encoder, hf_tok.backend_tokenizer, modes, normalize_, int(limit),
                   bool(st_conf.get("do_lower_case", False)))

    @property
    def dimension(self) -> int:
        return self.encoder.config.hidden_size * len(self.pooling)

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids with special tokens, one list per text; ``ValueError`` for a too-long text if not truncating."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encodings]
        too_long = [(i, len(s)) for i, s in enumerate(ids) if len(s) > self.max_seq_length]
        if too_long and not truncate:
            i, n = too_long[0]
            raise ValueError(f"text {i} has {n} tokens, more than the limit of {self.max_seq_length}; "
                             "pass truncate=True to cut it")
        if too_long:  # cut the content, keep the closing special token(s) as the tokenizer's template adds them
            limit = self.max_seq_length
            ids = [s if len(s) <= limit else self._truncate(texts[i], limit) for i, s in enumerate(ids)]
        return ids

    def _truncate(self, text: str, limit: int) -> list[int]:
        self.tokenizer.enable_truncation(limit)
        try:
            return self.tokenizer.encode(text, add_special_tokens=True).ids
        finally:
            self.tokenizer.no_truncation()

    def encode(self, texts: Sequence[str] | str, normalize_embeddings: bool | None = None,
               batch_tokens: int = 8192, truncate: bool = True, show_progress_bar: bool = False) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32 numpy) in the order of ``texts``.

        Texts are taken in arrival order into batches of at most ``batch_tokens`` real tokens (a text longer
        than the budget forms its own batch). ``normalize_embeddings`` defaults to the directory's Normalize module.
        """
        if isinstance(texts, str):
            raise ValueError("encode() takes a list of texts; wrap a single text in a list")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1; got {batch_tokens}")
        norm = self.normalize_embeddings if normalize_embeddings is None else normalize_embeddings
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        if len(texts) == 0:
            return out
        ids = self.tokenize(texts, truncate)
        batches = list(token_budget_batches([len(s) for s in ids], batch_tokens))
        bar = None
        if show_progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(texts), unit="text", desc="padfree encode")
        for start, end in batches:
            # inside a batch, sequences go by length: equal lengths then sit side by side, and attention runs
            # once per distinct length on a view, with no gather (the batches themselves keep arrival order)
            order = sorted(range(start, end), key=lambda i: len(ids[i]))
            batch = PackedBatch.from_sequences([ids[i] for i in order], device=self.encoder.device)
            hidden = self.encoder.forward_packed(batch)
            emb = torch.cat([pool(hidden, batch, m) for m in self.pooling], dim=-1)
            if norm:
                emb = normalize(emb)
            out[order] = emb.cpu().numpy()
            if bar is not None:
                bar.update(end - start)
        if bar is not None:
            bar.close()
        return out


def token_budget_batches(lengths: Sequence[int], budget: int):
    """Yield ``(start, end)`` ranges of consecutive items whose lengths sum to at most ``budget``
    (an item longer than the budget alone forms a batch)."""
    start, used = 0, 0
    for i, n in enumerate(lengths):
        if used and used + n > budget:
            yield start, i
            start, used = i, 0
        used += n
    if start < len(lengths):
        yield start, len(lengths)
