"""AsyncEngine: ``padfree serve``'s scheduler as a library, for asyncio applications.

Several models, each a :class:`padfree.pipelines.Pipeline`, behind one
:class:`padfree.serve.scheduler.Scheduler`: the texts of concurrent callers are tokenized on a small thread pool,
queued, and batched together by a budget of real tokens, one packed forward at a time on one worker thread, so that
the event loop never waits on a forward. The HTTP server is this engine behind routes; jobs and the library's
classes run pipelines directly (they have all their inputs at once).

    async with AsyncEngine() as engine:
        await engine.load("minilm", "sentence-transformers/all-MiniLM-L6-v2")
        vectors = await engine.embed(["a text", "another"])

An engine belongs to the event loop that first uses it. ``close()`` lets every queued request finish, then stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .batching import positive_int
from .pipelines import Pipeline, Seq
from .serve.scheduler import BatchStats, Scheduler, Ticket
from .startup import KINDS, open_pipeline
from .tokenizer import check_texts

DEFAULT_MAX_BATCH_TOKENS = 16384


class ModelNotFound(ValueError):
    """A model name the engine does not serve."""


@dataclass
class Served:
    """One model an engine serves: its name, its pipeline and where it came from."""
    name: str
    pipeline: Pipeline
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    last_ok: float = 0.0                   # perf_counter of its last good batch
    last_error: str | None = None          # the last batch's error, until a batch succeeds


def _counted(method):
    """An engine call that close() waits for, refused once close() was called."""
    @functools.wraps(method)
    async def call(self, *args, **kwargs):
        with self._call():
            return await method(self, *args, **kwargs)
    return call


class AsyncEngine:
    """See the module docstring. ``models``: pipelines already loaded (the first is the default model);
    :meth:`load` adds more. ``on_batch``: called with each batch's :class:`BatchStats` (metrics)."""

    def __init__(self, models: Sequence[Served] = (), max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 tokenization_workers: int = 2, on_batch: Callable[[BatchStats], None] | None = None):
        positive_int("tokenization_workers", tokenization_workers)
        self.models: dict[str, Served] = {}
        self.default: str | None = None
        self.scheduler = Scheduler(max_batch_tokens, on_batch=self._on_batch)
        self.tokenizers = ThreadPoolExecutor(tokenization_workers, thread_name_prefix="padfree-tokenize")
        self._hook = on_batch
        self._closed = False                # close() was called: no new call is taken
        self._stopped = False               # the scheduler has stopped
        self._active = 0                    # calls of embed/rerank/... not yet returned
        for m in models:
            self.add(m)

    # ------------------------------------------------------------------ models
    def add(self, served: Served) -> Served:
        """Serve a loaded pipeline under ``served.name`` (``ValueError`` for a name already served)."""
        if served.name in self.models:
            raise ValueError(f"model names must be unique; {served.name!r} is served already")
        self.scheduler.add_queue(served.name, served.pipeline.run)
        self.models[served.name] = served
        self.default = self.default or served.name
        return served

    async def load(self, name: str, source, dtype="auto", kind: str | None = None, adapter: str | None = None,
                   revision: str | None = None, token: str | None = None, warm: bool = True) -> Served:
        """Load ``source`` (a directory or a Hub ID, see :func:`padfree.startup.open_pipeline`) on a thread, so
        that the event loop goes on, and serve it as ``name``; ``ValueError`` naming what is wrong."""
        if name in self.models:
            raise ValueError(f"model names must be unique; {name!r} is served already")
        load = functools.partial(open_pipeline, source, dtype, kind, adapter, warm=warm, revision=revision,
                                 token=token)
        pipeline = await asyncio.get_running_loop().run_in_executor(None, load)
        return self.add(Served(name, pipeline, str(source)))

    def model(self, name: str | None = None, kind: str | None = None, what: str = "") -> Served:
        """The served model ``name`` (None: the default), checked to be of ``kind`` (to do ``what``):
        :class:`ModelNotFound` or ``ValueError`` naming the problem."""
        m = self.models.get(name or self.default or "")
        if m is None:
            raise ModelNotFound(f"model {name!r} is not served; served models: {sorted(self.models)}")
        if kind is not None and m.pipeline.kind != kind:
            raise ValueError(f"model {m.name!r} cannot do {what or KINDS[kind]}: it serves "
                             f"{KINDS[m.pipeline.kind]}")
        return m

    def _on_batch(self, stats: BatchStats) -> None:
        m = self.models[stats.queue]
        if stats.error is None:
            m.last_ok, m.last_error = time.perf_counter(), None
        else:
            m.last_error = f"{type(stats.error).__name__}: {stats.error}"
        if self._hook is not None:
            self._hook(stats)

    # ------------------------------------------------------------------ the request path
    async def prepare(self, fn: Callable[..., list[Seq]], *args, **kwargs) -> list[Seq]:
        """``fn(*args, **kwargs)`` (a pipeline's ``prepare``) on the tokenization pool."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizers,
                                                                lambda: fn(*args, **kwargs))

    def submit(self, m: Served, seqs: list[Seq]) -> Ticket:
        """Queue ``seqs`` on ``m``'s queue; await ``ticket.future`` for their rows (the scheduler starts on
        the running loop at the first call)."""
        if self._stopped:
            raise RuntimeError("the engine is closed")
        self.scheduler.start()
        return self.scheduler.submit(m.name, seqs, [len(q.ids) for q in seqs])

    async def run(self, m: Served, seqs: list[Seq]) -> list:
        """The final rows of ``seqs`` (in order) through the scheduler; a cancelled caller's sequences not yet
        batched are never computed."""
        ticket = self.submit(m, seqs)
        try:
            return await asyncio.shield(ticket.future)
        except asyncio.CancelledError:
            ticket.cancel()
            raise

    @contextlib.contextmanager
    def _call(self):
        """One call of embed/rerank/...: refused once close() was called; close() waits for those running."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    # ------------------------------------------------------------------ what callers ask for
    @_counted
    async def embed(self, texts: str | Sequence[str], model: str | None = None, *, normalize: bool | None = None,
                    dimensions: int | None = None, prompt_name: str | None = None, prompt: str | None = None,
                    truncate: bool = True, task: str | None = None, **output) -> np.ndarray:
        """Embeddings ``[N, D]`` in the order of ``texts`` (``[D]`` for one string), as
        :meth:`padfree.SentenceEncoder.encode` gives them; ``output``: more of the pipeline's output options
        (:meth:`padfree.pipelines.EmbedPipeline.output_options`)."""
        m = self.model(model, "embed")
        single, texts = _texts(texts)
        p = m.pipeline
        options = p.output_options(normalize, dimensions, **output)
        seqs = await self.prepare(p.prepare, texts, truncate, prompt=p.text.resolve_prompt(prompt, prompt_name),
                                  adapter=task, **options)
        rows = await self.run(m, seqs)
        return rows[0] if single else np.stack(rows)

    @_counted
    async def embed_sparse(self, texts: str | Sequence[str], model: str | None = None, *,
                           prompt_name: str | None = None, truncate: bool = True
                           ) -> list[tuple[np.ndarray, np.ndarray]]:
        """SPLADE vectors: per text, ``(indices, values)`` of its non-zero vocabulary weights."""
        m = self.model(model, "sparse")
        _, texts = _texts(texts)
        p = m.pipeline
        seqs = await self.prepare(p.prepare, texts, truncate, prompt=p.text.resolve_prompt(prompt_name=prompt_name))
        return await self.run(m, seqs)

    @_counted
    async def rerank(self, query: str, documents: Sequence[str], model: str | None = None, *,
                     raw_scores: bool = False, truncate: bool = True) -> np.ndarray:
        """Scores ``[N]`` of (query, document) pairs, in the order of ``documents``: the checkpoint's activation
        (as :meth:`padfree.CrossEncoder.score`), or its logits with ``raw_scores``."""
        m = self.model(model, "classify", "reranking")
        m.pipeline.check_reranker(m.name)
        _, docs = _texts(documents)
        if not isinstance(query, str):
            raise ValueError(f"query must be a string; got {type(query).__name__}")
        seqs = await self.prepare(m.pipeline.prepare, [query] * len(docs), docs, truncate,
                                  output="logits" if raw_scores else "scores")
        return np.stack(await self.run(m, seqs))[:, 0] if docs else np.empty(0, np.float32)

    @_counted
    async def classify(self, texts: str | Sequence[str], pairs: Sequence[str] | None = None,
                       model: str | None = None, *, output: str = "probabilities", truncate: bool = True
                       ) -> np.ndarray:
        """Per text (or (text, pair)), ``[L]`` probabilities, scores or logits (``output``) in label order
        (``pipeline.id2label``); ``[N, L]`` for a list."""
        m = self.model(model, "classify", "classification")
        single, texts = _texts(texts)
        seqs = await self.prepare(m.pipeline.prepare, texts, pairs, truncate, output=output)
        rows = await self.run(m, seqs)
        return rows[0] if single else np.stack(rows)

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        """Take no new call, let every call running finish (queued or still tokenizing), then stop the scheduler
        and the tokenization pool."""
        if self._closed:
            return
        self._closed = True
        while self._active:
            await asyncio.sleep(0.01)
        self._stopped = True
        await self.scheduler.stop()
        self.tokenizers.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncEngine":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _texts(texts) -> tuple[bool, list[str]]:
    """(one string given?, the texts as a list); ``ValueError`` naming a text that is not a string."""
    if isinstance(texts, str):
        return True, [texts]
    return False, check_texts(texts)
