"""SentenceEncoder: a sentence-transformers directory run padding-free.

Reads ``modules.json`` (Transformer -> Pooling -> any of Dense, LayerNorm, Normalize, in order) and
``config_sentence_transformers.json`` (prompts, ``truncate_dim``), tokenizes with the directory's ``tokenizer.json`` (no ``transformers`` import), batches texts in
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
from .directory import Module, read_json, read_layout
from .hub import resolve_model
from .loading import from_pretrained, read_weights
from .models.encoder import Encoder
from .pipelines import EmbedPipeline
from .pooling import normalize as unit_norm
from .quantize import DTYPES, RANGED, calibration_ranges
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
STEP_KINDS = ("Dense", "LayerNorm", "Normalize")  # modules after Pooling, applied to the pooled vector in order
MODULE_KINDS = ("Transformer", "Pooling") + STEP_KINDS
# the torch.nn activations a Dense may name, built with no arguments: an allow-list, since the name is code to import
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "ReLU6", "GELU", "Sigmoid", "SiLU", "Mish", "ELU", "SELU", "CELU",
               "LeakyReLU", "Softplus", "Softsign", "Hardtanh", "Hardswish", "Hardsigmoid", "Tanhshrink", "LogSigmoid")
_ACTIVATION_FILES = {"Identity": "linear"}  # torch.nn.modules.<file>.<name>; the others are in activation
_EMBEDDING = "sentence_embedding"  # the feature a step reads and writes (its module_input_name / module_output_name)


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


class EmbedModules(NamedTuple):
    """What an embedding directory's ``modules.json`` and configs say, read before any weight."""
    transformer_dir: Path
    pooling: list[str]             # padfree modes, in sentence-transformers' concatenation order
    include_prompt: bool
    normalize: bool                # modules.json ends in Normalize: the default of normalize_embeddings
    steps: tuple[Module, ...]      # the modules after Pooling (Dense, LayerNorm, Normalize), a final Normalize aside
    truncate_dim: int | None       # config_sentence_transformers.json's Matryoshka cut


def read_embed_modules(path) -> EmbedModules:
    """The :class:`EmbedModules` of a sentence-transformers directory (a plain Hugging Face one pools by mean, as
    sentence-transformers does). ``ValueError`` naming an unsupported module, a step before Pooling, or a Dense
    with an activation outside :data:`ACTIVATIONS`, before any weight is read."""
    layout = read_layout(path)
    layout.check_kinds(MODULE_KINDS)
    kinds = [m.kind for m in layout.modules]
    after = kinds.index("Pooling") + 1 if "Pooling" in kinds else len(kinds)
    early = [m for m in layout.modules[:after] if m.kind in STEP_KINDS]
    if early:
        raise ValueError(f"module {early[0].type!r} comes before Pooling; padfree applies {', '.join(STEP_KINDS)} "
                         "to the pooled vector (a sentence-transformers directory lists them after Pooling)")
    steps = layout.modules[after:]
    for m in steps:
        check_step(m)
    normalize = bool(steps) and steps[-1].kind == "Normalize"
    pooling = layout.find("Pooling")
    modes, include_prompt = _pooling(pooling.config()) if pooling else (["mean"], True)
    truncate_dim = read_json(layout.root / "config_sentence_transformers.json").get("truncate_dim")
    return EmbedModules(layout.model_dir("Transformer"), modes, include_prompt, normalize,
                        steps[:-1] if normalize else steps, truncate_dim)


def check_step(module: Module) -> dict:
    """A step's config; ``ValueError`` naming what padfree does not run: another feature than the sentence
    embedding, or a Dense activation outside :data:`ACTIVATIONS`."""
    conf = module.config()
    for key in ("module_input_name", "module_output_name"):
        if conf.get(key) not in (None, _EMBEDDING):
            raise ValueError(f"{module.type} in {module.path} has {key}={conf[key]!r}; padfree applies the modules "
                             f"after Pooling to {_EMBEDDING!r} only")
    if module.kind == "Dense":
        _activation(conf.get("activation_function"), module)
    return conf


def _activation(name: str | None, module: Module) -> torch.nn.Module:
    """The Dense's activation (sentence-transformers' default, Tanh, where its config names none) from the
    allow-list; ``ValueError`` naming it and the list otherwise."""
    if name is None:
        return torch.nn.Tanh()
    for cls in ACTIVATIONS:
        if name in (f"torch.nn.modules.{_ACTIVATION_FILES.get(cls, 'activation')}.{cls}", f"torch.nn.{cls}"):
            return getattr(torch.nn, cls)()
    raise ValueError(f"Dense in {module.path} has activation_function {name!r}; padfree runs the torch.nn "
                     f"activations {', '.join(ACTIVATIONS)}")


class DenseStep(torch.nn.Module):
    """sentence-transformers' Dense: ``activation(x·Wᵀ + b)`` (plus ``x``, or ``x·Rᵀ`` where the widths differ,
    with ``use_residual``): ``[n, in_features]`` -> ``[n, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: torch.nn.Module,
                 use_residual: bool):
        super().__init__()
        self.in_features, self.out_features, self.use_residual = in_features, out_features, use_residual
        self.linear = torch.nn.Linear(in_features, out_features, bias=bias)
        self.activation = activation
        if use_residual and in_features != out_features:
            self.residual = torch.nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.in_features == self.out_features else self.residual(x))
        return out


class NormalizeStep(torch.nn.Module):
    """A Normalize in the middle of the chain: unit L2 norm of ``[n, D]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unit_norm(x)


def build_steps(modules: Sequence[Module], width: int, device) -> list[torch.nn.Module]:
    """The steps of :attr:`EmbedModules.steps` with their weights (``model.safetensors`` or ``pytorch_model.bin``
    in each module's folder), fp32 on ``device``, for pooled vectors ``width`` wide; ``ValueError`` naming a
    module whose width or weights do not fit."""
    out = []
    for m in modules:
        step = _build_step(m, check_step(m), width)
        step.to(device=device, dtype=torch.float32).requires_grad_(False).eval()
        width = getattr(step, "out_features", width)
        out.append(step)
    return out


def _build_step(module: Module, conf: dict, width: int) -> torch.nn.Module:
    """One step from its config, for vectors ``width`` wide, with its weights."""
    if module.kind == "Normalize":
        return NormalizeStep()
    key = "in_features" if module.kind == "Dense" else "dimension"
    if conf.get(key) != width:
        raise ValueError(f"{module.type} in {module.path} has {key}={conf.get(key)!r}, but the vectors it receives "
                         f"are {width} wide")
    if module.kind == "Dense":
        step = DenseStep(width, int(conf["out_features"]), bool(conf.get("bias", True)),
                         _activation(conf.get("activation_function"), module), bool(conf.get("use_residual")))
        state = read_weights(module.path)
    else:
        step = torch.nn.LayerNorm(width)
        state = {k.removeprefix("norm."): v for k, v in read_weights(module.path).items()}
    try:
        step.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the weights of {module.type} in {module.path} do not fit it: {e}") from None
    return step


class SentenceEncoder:
    """Text in, embeddings out: ``encode(texts) -> numpy [N, D]`` (``[D]`` for a single string).

    One instance may be shared by threads: encoding mutates nothing on it (the tokenizer is configured once per
    truncation length, see :mod:`padfree.tokenizer`). Setting ``max_seq_length`` or ``prompts`` while other
    threads encode is not synchronised.
    """

    def __init__(self, encoder: Encoder, tokenizer: Tokenizer, pooling: list[str], normalize_embeddings: bool,
                 max_seq_length: int, do_lower_case: bool = False, prompts: dict[str, str] | None = None,
                 default_prompt_name: str | None = None, include_prompt: bool = True,
                 steps: Sequence[torch.nn.Module] = (), truncate_dim: int | None = None):
        text = TextSide(tokenizer, encoder.config.max_sequence_length, max_seq_length, do_lower_case, prompts,
                        default_prompt_name, include_prompt)
        self.pipeline = EmbedPipeline(encoder, text, pooling, normalize_embeddings, steps, truncate_dim)

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
        found = read_embed_modules(path)  # unsupported modules refused here, before any weight is read
        encoder = from_pretrained(found.transformer_dir, dtype=dtype, device=device, backend=backend, task=task)
        text = TextSide.from_dir(found.transformer_dir, path, encoder.config.max_sequence_length, max_seq_length,
                                 prompts, default_prompt_name, found.include_prompt)
        steps = build_steps(found.steps, encoder.config.hidden_size * len(found.pooling), encoder.device)
        return cls.from_pipeline(EmbedPipeline(encoder, text, found.pooling, found.normalize, steps,
                                               found.truncate_dim))

    # the pipeline's parts, as sentence-transformers names them
    encoder = property(lambda self: self.pipeline.encoder)
    tokenizer = property(lambda self: self.pipeline.text.tokenizer)
    pooling = property(lambda self: self.pipeline.pooling)
    do_lower_case = property(lambda self: self.pipeline.text.do_lower_case)
    prompts = property(lambda self: self.pipeline.text.prompts)
    default_prompt_name = property(lambda self: self.pipeline.text.default_prompt_name)
    include_prompt = property(lambda self: self.pipeline.text.include_prompt)

    @property
    def dimension(self) -> int:
        """The width of ``encode``'s float vectors: ``truncate_dim`` where it cuts, else the model's (the last
        Dense's ``out_features``, else the pooled width), as sentence-transformers' ``get_embedding_dimension``."""
        return min(self.pipeline.dimension, self.truncate_dim or self.pipeline.dimension)

    @property
    def truncate_dim(self) -> int | None:
        """The default Matryoshka cut of ``encode`` (``config_sentence_transformers.json``'s ``truncate_dim``);
        may be set, as ``SentenceTransformer.truncate_dim`` can."""
        return self.pipeline.truncate_dim

    @truncate_dim.setter
    def truncate_dim(self, value: int | None) -> None:
        self.pipeline.truncate_dim = value

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
               convert_to_numpy: bool = True, task: str | None = None, precision: str = "float32",
               calibration_embeddings=None, truncate_dim: int | None = None) -> np.ndarray:
        """Embeddings ``[N, D]`` (float32 numpy, or quantized: see ``precision``) in the order of ``texts``; one
        string gives ``[D]``.

        Texts (any iterable of strings) are taken in arrival order into batches of at most ``batch_tokens`` real
        tokens (default 8192 when neither limit is given; a text longer than the budget forms its own batch) and,
        when ``batch_size`` is given, at most that many texts. ``prompt`` / ``prompt_name`` as in
        sentence-transformers (default: the directory's ``default_prompt_name``). ``normalize_embeddings``
        defaults to the directory's Normalize module. ``convert_to_numpy`` is accepted for code written against
        sentence-transformers; the result is always numpy. ``task``: for a model with task LoRA adapters
        (jina-embeddings-v3), the adapter to run (None: the one chosen at load); each task's merged weights are
        built on its first use and kept (about one model's memory per task used, see
        :class:`padfree.lora.TaskAdapters`). The task does not choose a prompt: pass ``prompt_name`` for that.
        ``truncate_dim``: the Matryoshka cut of this call (default: the model's :attr:`truncate_dim`), applied
        before ``normalize_embeddings`` (sentence-transformers normalizes first where the directory ends in
        Normalize, so its cut vectors are not of unit norm; padfree's are).

        ``precision`` (as sentence-transformers' ``quantize_embeddings``, after the cut and the norm): "float32",
        "int8" / "uint8" ``[N, D]`` (each dimension in 256 steps between the per-dimension min and max of
        ``calibration_embeddings`` ``[n, D]`` where given, else between each vector's own min and max: not the
        batch's, so a vector never depends on the texts beside it), "binary" / "ubinary" ``[N, ceil(D/8)]``
        (bits ``x > 0`` packed; binary int8 = the bytes - 128, ubinary uint8). See :mod:`padfree.quantize`.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else check_texts(texts)
        budget = check_budget(batch_tokens, batch_size)
        text_prompt = self.resolve_prompt(prompt, prompt_name)
        options = self.output_options(normalize_embeddings, truncate_dim, precision, calibration_embeddings)
        if len(texts) == 0:
            return np.empty((0, self.pipeline.width(options)), dtype=DTYPES[precision])
        seqs = self.pipeline.prepare(texts, truncate, prompt=text_prompt, adapter=task, **options)
        out = np.stack(self._run(seqs, budget, batch_size, show_progress_bar))
        return out[0] if single else out

    def output_options(self, normalize_embeddings: bool | None = None, truncate_dim: int | None = None,
                       precision: str = "float32", calibration_embeddings=None) -> dict:
        """The pipeline's output options (:meth:`padfree.pipelines.EmbedPipeline.output_options`) of ``encode``'s
        arguments; ``ValueError`` naming a bad one."""
        ranges = None
        if calibration_embeddings is not None and precision in RANGED:
            ranges = calibration_ranges(calibration_embeddings)
        return self.pipeline.output_options(normalize_embeddings, truncate_dim, precision, ranges)

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
        :meth:`encode`), then goes through the directory's modules after Pooling (Dense, LayerNorm, Normalize) and
        its ``truncate_dim``, as a text's vector does, so that chunks and texts live in one space; a model that
        pools one token per text (cls, lasttoken) is refused with a ``ValueError``, since that token has no
        per-chunk meaning. ``normalize_embeddings``, ``prompt`` / ``prompt_name`` and ``batch_tokens`` (documents
        batched in arrival order) as in :meth:`encode`.

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
