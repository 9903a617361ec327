"""Task heads on the packed encoder: sequence classification, token classification, cross-encoder reranking.

Each head is loaded from a Hugging Face ``*ForSequenceClassification`` / ``*ForTokenClassification``
checkpoint of any padfree family; the classifier's shape is the family's own (:class:`HeadSpec`): BERT/ALBERT
pooler + classifier, RoBERTa/MPNet dense + tanh + out_proj, DistilBERT pre_classifier + ReLU, ELECTRA
dense + GELU, DeBERTa ContextPooler. Heads read the packed hidden states ``[T, H]``: no pad is computed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batch import PackedBatch
from .loading import Loaded, load
from .models.families import HeadSpec
from .ops.activations import apply_activation
from .pooling import pool
from .outputs import SequenceClassifierOutput, TokenClassifierOutput
from .batching import DEFAULT_BATCH_TOKENS
from .directory import read_json, read_layout
from .hub import resolve_model, resolve_source
from .pipelines import ClassifyPipeline, Seq, TokenClassifyPipeline, activate
from .tokenizer import Tokenizer, check_texts

PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")


def _linear(state: dict, prefix: str, device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of the checkpoint's linear layer ``prefix``; ``ValueError`` naming it if absent."""
    if f"{prefix}.weight" not in state:
        raise ValueError(f"checkpoint has no {prefix}.weight: is it a task checkpoint (*ForSequenceClassification "
                         "or *ForTokenClassification) of this family?")
    w = state[f"{prefix}.weight"].to(device=device, dtype=dtype)
    b = state.get(f"{prefix}.bias")
    return w, None if b is None else b.to(device=device, dtype=dtype)


def _labels(hf_config: dict, num_labels: int) -> list[str]:
    id2label = {int(k): v for k, v in (hf_config.get("id2label") or {}).items()}
    return [id2label.get(i, f"LABEL_{i}") for i in range(num_labels)]


class _Transform:
    """What a head computes before its output linear: ``norm(act(dense(x)))``, each part where the head has it."""

    def __init__(self, loaded: Loaded, spec: HeadSpec):
        enc, state = loaded.encoder, loaded.hf_state
        self.dense = None if spec.dense is None else _linear(state, spec.dense, enc.device, enc.dtype)
        self.activation = spec.activation
        self.norm = None if spec.norm is None else _linear(state, spec.norm, enc.device, enc.dtype)  # (w, b)
        self.eps = enc.config.layer_norm_eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = F.linear(x, *self.dense)
            x = torch.tanh(x) if self.activation == "tanh" else apply_activation(x, self.activation)
        if self.norm is not None:
            x = F.layer_norm(x, x.shape[-1:], *self.norm, self.eps)
        return x


class SequenceClassifier:
    """Logits ``[B, num_labels]`` for each sequence, and labels from the config's ``id2label``.

    ``problem_type`` (from the config, as Hugging Face reads it): single-label (softmax), multi-label
    (sigmoid, every label above a threshold) or regression (raw values; num_labels == 1 by default).
    """

    def __init__(self, loaded: Loaded, tokenizer=None):
        enc, cfg, state = loaded.encoder, loaded.hf_config, loaded.hf_state
        if loaded.family.sequence_head is None:
            raise ValueError(f"family {loaded.family.name} has no sequence-classification head mapping")
        spec = loaded.family.sequence_head(cfg)
        self.encoder = enc
        self.pooling = spec.pooling
        self.transform = _Transform(loaded, spec)
        self.out = _linear(state, spec.out, enc.device, enc.dtype)
        self.num_labels = self.out[0].shape[0]
        self.id2label = _labels(cfg, self.num_labels)
        problem = cfg.get("problem_type") or ("regression" if self.num_labels == 1 else "single_label_classification")
        if problem not in PROBLEM_TYPES:
            raise ValueError(f"unsupported problem_type {problem!r}; expected one of {PROBLEM_TYPES}")
        self.problem_type = problem
        self.tokenizer = Tokenizer.coerce(tokenizer)

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        tokenizer=None, task: str | None = None, *, revision: str | None = None,
                        token: str | None = None) -> "SequenceClassifier":
        """From a ``*ForSequenceClassification`` directory, its Hub ID (``org/name``; ``revision``, ``token``: see
        :func:`padfree.hub.resolve_model`) or an in-memory model. A directory's fast tokenizer is
        loaded (for :meth:`predict`) unless ``tokenizer`` is given (a :class:`padfree.tokenizer.Tokenizer` or a
        ``transformers`` fast tokenizer). ``task``: the encoder's LoRA adapter merged at load (jina-embeddings-v3,
        see :func:`padfree.from_pretrained`)."""
        source = resolve_source(source, revision, token)
        return cls(load(source, dtype, device, backend, task), tokenizer or _maybe_tokenizer(source))

    @torch.inference_mode()
    def logits_packed(self, batch: PackedBatch) -> torch.Tensor:
        """``[B, num_labels]`` fp32 logits for a packed batch."""
        hidden = self.encoder.forward_packed(batch)  # [T, H]
        return self.head(hidden, batch)

    def head(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """The classifier on the first token (or the mean of the tokens) of each sequence: ``[T, H]`` ->
        ``[B, num_labels]`` fp32."""
        if self.pooling == "mean":
            x = pool(hidden, batch, "mean").to(hidden.dtype)  # [B, H], summed in fp32
        else:
            x = hidden[batch.cu_seqlens[:-1].long()]  # [B, H]
        return F.linear(self.transform(x), *self.out).float()

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 position_ids=None) -> SequenceClassifierOutput:
        """Hugging Face-style call on a padded ``[B, S]`` batch (any padding side): ``.logits [B, num_labels]``.
        ``position_ids`` as transformers reads them (see :meth:`padfree.Encoder.forward`)."""
        batch = self.encoder.pack(input_ids, attention_mask, token_type_ids, position_ids)
        return SequenceClassifierOutput(self.logits_packed(batch))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label), sigmoid (multi-label) or the raw values (regression)."""
        if self.problem_type == "single_label_classification":
            return logits.softmax(-1)
        if self.problem_type == "multi_label_classification":
            return logits.sigmoid()
        return logits

    def labels(self, logits: torch.Tensor, threshold: float = 0.5) -> list:
        """Per sequence: the argmax label (single-label), the list of labels whose sigmoid is above
        ``threshold`` (multi-label), or the predicted value(s) (regression)."""
        if self.problem_type == "single_label_classification":
            return [self.id2label[i] for i in logits.argmax(-1).tolist()]
        if self.problem_type == "multi_label_classification":
            return [[self.id2label[i] for i, on in enumerate(row) if on]
                    for row in (logits.sigmoid() > threshold).tolist()]
        return [row[0] if len(row) == 1 else row for row in logits.tolist()]

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None, threshold: float = 0.5,
                batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list:
        """Labels for texts (or text pairs), in input order; batched in order by a budget of ``batch_tokens``
        real tokens. Needs a tokenizer."""
        pipeline = ClassifyPipeline(self, self.tokenizer)
        seqs = pipeline.prepare(texts, pairs, truncate=True, output="logits")
        if not seqs:
            return []
        return self.labels(torch.from_numpy(np.stack(pipeline.run_all(seqs, batch_tokens))), threshold)


class TokenClassifier:
    """Logits for every real token (packed ``[T, num_labels]``), e.g. named-entity tags."""

    def __init__(self, loaded: Loaded, tokenizer=None):
        enc = loaded.encoder
        head = loaded.family.token_head
        if head is None:
            raise ValueError(f"token classification is not supported for family {loaded.family.name} yet")
        spec = HeadSpec(None, "", head, pooling="none") if isinstance(head, str) else head(loaded.hf_config)
        self.encoder = enc
        self.transform = _Transform(loaded, spec)
        self.out = _linear(loaded.hf_state, spec.out, enc.device, enc.dtype)
        self.num_labels = self.out[0].shape[0]
        self.id2label = _labels(loaded.hf_config, self.num_labels)
        self.tokenizer = Tokenizer.coerce(tokenizer)

    @classmethod
    def from_pretrained(cls, source, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        tokenizer=None, task: str | None = None, *, revision: str | None = None,
                        token: str | None = None) -> "TokenClassifier":
        """As :meth:`SequenceClassifier.from_pretrained`, from a ``*ForTokenClassification`` checkpoint."""
        source = resolve_source(source, revision, token)
        return cls(load(source, dtype, device, backend, task), tokenizer or _maybe_tokenizer(source))

    @torch.inference_mode()
    def logits_packed(self, batch: PackedBatch) -> torch.Tensor:
        """``[T, num_labels]`` fp32 logits, one row per real token."""
        return self.head(self.encoder.forward_packed(batch))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier on every token: ``[T, H]`` -> ``[T, num_labels]`` fp32."""
        return F.linear(self.transform(hidden), *self.out).float()

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 position_ids=None) -> TokenClassifierOutput:
        """Padded ``[B, S]`` in, ``.logits [B, S, num_labels]`` out with zeros at pads. ``position_ids`` as
        transformers reads them (see :meth:`padfree.Encoder.forward`)."""
        batch = self.encoder.pack(input_ids, attention_mask, token_type_ids, position_ids)
        return TokenClassifierOutput(batch.unpack(self.logits_packed(batch)))

    def predict(self, texts: Sequence[str], batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[list[dict]]:
        """Per text, one entry per word: ``{"word", "label", "score", "start", "end"}`` (the label of each
        word's first sub-token; offsets are character spans in the text). Batched in order by a budget of
        ``batch_tokens`` real tokens. Needs a tokenizer."""
        texts = check_texts(texts)
        pipeline = TokenClassifyPipeline(self, self.tokenizer)
        enc = pipeline.encodings(texts)
        rows = pipeline.run_all([Seq(e.ids) for e in enc], batch_tokens)
        return [words_from_tokens(torch.from_numpy(r), e.word_ids, self.id2label, e.offsets, text)
                for r, e, text in zip(rows, enc, texts)]


def words_from_tokens(logits: torch.Tensor, word_ids: Sequence[int | None], id2label: Sequence[str],
                      offsets: Sequence[tuple[int, int]] | None = None, text: str | None = None) -> list[dict]:
    """Map one sequence's token logits ``[L, C]`` back to words with a fast tokenizer's ``word_ids``
    (None for special tokens): each word takes its first sub-token's label; with ``offsets`` the word's
    character span covers all its sub-tokens."""
    probs = logits.float().softmax(-1)
    words: dict[int, dict] = {}
    for t, w in enumerate(word_ids):
        if w is None:
            continue
        if w not in words:
            score, label = probs[t].max(-1)
            words[w] = {"word_index": w, "label": id2label[int(label)], "score": float(score), "token": t}
            if offsets is not None:
                words[w]["start"], words[w]["end"] = offsets[t]
        elif offsets is not None:
            words[w]["end"] = offsets[t][1]
    out = [words[w] for w in sorted(words)]
    if text is not None and offsets is not None:
        for w in out:
            w["word"] = text[w["start"]:w["end"]]
    return out


_CE_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


class CrossEncoder:
    """Reranking: score (query, passage) pairs with a sequence-classification checkpoint.

    Loads a Hugging Face ``*ForSequenceClassification`` directory or a sentence-transformers CrossEncoder
    directory (``activation_fn`` from ``config_sentence_transformers.json``, or from ``config.json`` in older
    layouts; default: sigmoid for one label, none otherwise; ``max_seq_length`` from ``sentence_bert_config.json``).
    A facade over :class:`padfree.pipelines.ClassifyPipeline`.
    """

    def __init__(self, classifier: SequenceClassifier, tokenizer, activation: str, max_length: int | None = None):
        if tokenizer is None:
            raise ValueError("CrossEncoder needs a tokenizer (tokenizer.json)")
        self.pipeline = ClassifyPipeline(classifier, tokenizer, activation, max_length)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu", backend: str = "auto",
                        max_length: int | None = None, *, revision: str | None = None,
                        token: str | None = None) -> "CrossEncoder":
        """From a CrossEncoder or ``*ForSequenceClassification`` directory, or its Hub ID (``org/name``;
        ``revision``, ``token``: see :func:`padfree.hub.resolve_model`)."""
        # a modular layout: the Transformer module's folder holds the checkpoint
        layout = read_layout(resolve_model(path, revision, token))
        path, model_dir = layout.root, layout.model_dir("Transformer", "CrossEncoder")
        loaded = load(model_dir, dtype, device, backend)
        clf = SequenceClassifier(loaded, _maybe_tokenizer(model_dir) or _maybe_tokenizer(path))
        conf = loaded.hf_config
        st_conf = read_json(path / "config_sentence_transformers.json")  # sentence-transformers >= 5 layout
        fn = (st_conf.get("activation_fn") or (conf.get("sentence_transformers") or {}).get("activation_fn")
              or conf.get("sbert_ce_default_activation_function"))  # older layouts keep it in config.json
        if fn is None:
            activation = "sigmoid" if clf.num_labels == 1 else "identity"
        else:
            name = fn.rsplit(".", 1)[-1]
            if name not in _CE_ACTIVATIONS:
                raise ValueError(f"unsupported CrossEncoder activation_fn {fn!r}; supported: {sorted(_CE_ACTIVATIONS)}")
            activation = _CE_ACTIVATIONS[name]
        limit = max_length or read_json(model_dir / "sentence_bert_config.json").get("max_seq_length") \
            or conf.get("max_length")
        return cls(clf, clf.tokenizer, activation, limit)

    # the pipeline's parts
    classifier = property(lambda self: self.pipeline.classifier)
    tokenizer = property(lambda self: self.pipeline.tokenizer)
    activation = property(lambda self: self.pipeline.activation)  # "sigmoid", "identity" or "tanh"
    max_length = property(lambda self: self.pipeline.max_length)

    @property
    def max_input_length(self) -> int:
        """Pairs are cut to this many tokens (special tokens included)."""
        return self.pipeline.max_input_length

    def score(self, pairs: Sequence[tuple[str, str]], batch_tokens: int = DEFAULT_BATCH_TOKENS) -> np.ndarray:
        """Scores ``[N]`` (or ``[N, num_labels]``) for (query, passage) pairs, in input order; pairs are
        batched in order by a budget of ``batch_tokens`` real tokens."""
        pairs = list(pairs)
        num_labels = self.classifier.num_labels
        if len(pairs) == 0:
            return np.empty((0,) if num_labels == 1 else (0, num_labels), np.float32)
        bad = [i for i, p in enumerate(pairs) if isinstance(p, str) or len(p) != 2]
        if bad:
            raise ValueError(f"pair {bad[0]} is not a (query, passage) pair: {pairs[bad[0]]!r:.60}")
        seqs = self.pipeline.prepare([q for q, _ in pairs], [p for _, p in pairs], truncate=True, output="scores")
        scores = np.stack(self.pipeline.run_all(seqs, batch_tokens))
        return scores[:, 0] if num_labels == 1 else scores

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The checkpoint's activation on logits: the scores that :meth:`score` returns."""
        return activate(logits, self.activation)

    def rank(self, query: str, passages: Sequence[str], top_k: int | None = None) -> list[dict]:
        """Passages sorted by descending score: ``[{"corpus_id", "score"}]`` (sentence-transformers' shape)."""
        scores = self.score([(query, p) for p in passages])
        if scores.ndim != 1:
            raise ValueError("rank() needs a single-score model (num_labels == 1)")
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [{"corpus_id": int(i), "score": float(scores[i])} for i in order]

    def rerank(self, queries: Sequence[str], passages: Sequence[Sequence[str]], top_k: int | None = None
               ) -> list[list[dict]]:
        """:meth:`rank` for each query with its own candidate passages, scored in one pass."""
        pairs = [(q, p) for q, ps in zip(queries, passages, strict=True) for p in ps]
        scores = self.score(pairs)
        out, start = [], 0
        for ps in passages:
            s = scores[start:start + len(ps)]
            start += len(ps)
            order = np.argsort(-s, kind="stable")[:top_k]
            out.append([{"corpus_id": int(i), "score": float(s[i])} for i in order])
        return out


def _maybe_tokenizer(source) -> Tokenizer | None:
    """The directory's tokenizer, or None (in-memory models, directories without tokenizer files)."""
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    return Tokenizer.from_pretrained(path)
