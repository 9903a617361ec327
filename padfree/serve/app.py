"""The HTTP layer of ``padfree serve``: routes that validate a request, map its shape (OpenAI, TEI, Cohere) onto a
:class:`padfree.pipelines.Pipeline` (which makes the final rows), and map rows and errors onto each API's bodies.
Each route is a small function of its own; :func:`create_app` registers them from :data:`ROUTES`.

Request path: HTTP -> :class:`Guard` (auth, in-flight limit, payload limit, one log line) -> route (validate)
-> tokenize on a small thread pool -> :class:`Scheduler` queue -> batch -> forward on the worker thread -> the
request's own rows -> JSON (or base64) response with timing headers. A client that leaves while queued is
dropped before compute.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, cpu, info
from ..batching import positive_int
from ..engine import AsyncEngine, ModelNotFound, Served
from ..pipelines import Seq
from ..quantize import quantize
from ..tokenizer import InputTooLong
from . import schemas as s
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .telemetry import HTTP_STATUS, Tracing, request_fields, request_id

log = logging.getLogger("padfree.serve")

# routes that run a model: the in-flight limit and the request log's text/token counts apply to these
INFERENCE_ROUTES = {"/v1/embeddings", "/embed", "/embed_all", "/embed_sparse", "/rerank", "/predict", "/v1/rerank",
                    "/v2/embed", "/v2/rerank", "/"}
OPEN_ROUTES = {"/health", "/ready", "/metrics"}  # no API key needed (probes, scrapes)
HEALTH_FRESH_S = 10.0                   # a batch that ran this recently proves the model can run


@dataclass
class ServeConfig:
    max_batch_tokens: int = 16384          # real tokens per forward
    max_client_batch_size: int = 64        # inputs per request
    max_concurrent_requests: int = 512     # inference requests in flight before 429
    payload_limit: int = 2_000_000         # request body bytes before 413
    auto_truncate: bool = False            # default of `truncate` (OpenAI's route has no such field)
    api_key: str | None = None             # Bearer key for every route but /health and /metrics
    tokenization_workers: int = 2

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_client_batch_size", "max_concurrent_requests", "payload_limit",
                     "tokenization_workers"):
            positive_int(name, getattr(self, name))
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")


@dataclass(frozen=True)
class ModelSpec:
    """A model the server loads after binding its socket: served as ``name``, from ``source`` (a directory or a
    Hub ID at ``revision``)."""
    name: str
    source: str
    dtype: str = "auto"
    revision: str | None = None
    token: str | None = None


class ApiError(Exception):
    """An error answered with the route's error body: ``kind`` is TEI's error_type (Validation, Overloaded,
    Backend, Unhealthy, Unauthorized, NotFound, PayloadTooLarge)."""

    def __init__(self, status: int, message: str, kind: str = "Validation", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


_OPENAI_TYPES = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}
_FAILURE_KINDS = {400: "validation", 401: "auth", 404: "not_found", 405: "not_found", 413: "payload",
                  422: "validation", 429: "overloaded"}


def error_body(path: str, e: ApiError) -> bytes:
    """OpenAI's error body on ``/v1/*``, TEI's elsewhere."""
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    else:
        body = {"error": e.message, "error_type": e.kind}
    return json.dumps(body).encode()


def _json(obj: Any, headers: dict | None = None, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")).encode(), status_code=status, headers=headers,
                    media_type="application/json")


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "overloaded" if status == 429 else "client_error" if status < 500 \
        else "server_error"


class Guard:
    """Pure ASGI middleware in front of the routes: the request id (``x-request-id``, the client's or a new one),
    the request's trace span (when tracing is on), API key (constant-time comparison), readiness (503 while
    loading or draining), the in-flight limit (429 at once), the payload limit (413 before the body is parsed),
    and one INFO log line per request."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path, t0 = self.state, scope["path"], time.perf_counter()
        rid = request_id(scope["headers"])
        extra = scope.setdefault("state", {})
        extra["request_id"] = rid
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
                if "ran" in extra:
                    st.trace(extra, "postprocess", extra["ran"], time.perf_counter())
            await send(message)

        route = path if path in st.routes else None
        span = st.tracing.request(scope["method"], path, scope["headers"], route) if st.tracing is not None \
            else contextlib.nullcontext()
        with span as extra["span"]:
            try:
                await self._serve(scope, receive, send_wrapper)
            finally:
                code = status["code"]
                if extra["span"] is not None:
                    extra["span"].set_attribute(HTTP_STATUS, code)
                if extra.get("gone"):
                    outcome = "cancelled"
                else:
                    outcome = _outcome(code)
                    if code >= 400:
                        st.metrics.failures.labels(_FAILURE_KINDS.get(code, "backend" if code >= 500 else
                                                                      "validation")).inc()
                st.metrics.requests.labels(route or "other", outcome).inc()
                ms = (time.perf_counter() - t0) * 1e3
                log.info("%s %s %s %s texts=%s tokens=%s %.1fms id=%s", scope["method"], path, code,
                         extra.get("model", "-"), extra.get("texts", "-"), extra.get("tokens", "-"), ms, rid,
                         extra=request_fields(rid, scope["method"], path, extra.get("model"), extra.get("texts"),
                                              extra.get("tokens"), code, ms))

    async def _serve(self, scope, receive, send) -> None:
        st, path = self.state, scope["path"]

        async def reply(e: ApiError):
            await send({"type": "http.response.start", "status": e.status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": error_body(path, e)})

        inference = path in INFERENCE_ROUTES
        if st.config.api_key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
            return await reply(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        "Unauthorized", code="invalid_api_key"))
        reason = st.unready() if inference else None
        if reason is not None:
            return await reply(ApiError(503, reason, "Unhealthy"))
        if inference and st.in_flight >= st.config.max_concurrent_requests:
            return await reply(ApiError(429, f"model is overloaded: {st.in_flight} requests in flight, the "
                                             f"limit is {st.config.max_concurrent_requests} "
                                             "(--max-concurrent-requests); retry later", "Overloaded",
                                        code="rate_limit_exceeded"))
        if inference:
            st.in_flight += 1
            st.metrics.in_flight.inc()
        try:
            body = await self._read_body(scope, receive)
            if body is None:
                return await reply(ApiError(413, f"request body is larger than the payload limit of "
                                                 f"{st.config.payload_limit} bytes (--payload-limit)",
                                            "PayloadTooLarge"))
            await self.app(scope, _replay(body, receive), send)
        finally:
            if inference:
                st.in_flight -= 1
                st.metrics.in_flight.dec()

    def _authorized(self, scope) -> bool:
        expected = f"Bearer {self.state.config.api_key}".encode()
        for k, v in scope["headers"]:
            if k == b"authorization":
                return hmac.compare_digest(v, expected)
        return False

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None once it passes the payload limit (Content-Length is checked first)."""
        limit = self.state.config.payload_limit
        for k, v in scope["headers"]:
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending everything
                return b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI receive that gives the buffered body once, then the client's own messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


class ServerState:
    """What the routes share: the :class:`padfree.engine.AsyncEngine` (models, scheduler, tokenization pool),
    the config, the metrics, and the server's phase: loading (models named in ``pending`` load after the socket
    is bound), ready, or draining (after SIGTERM)."""

    def __init__(self, models: Sequence[Served], config: ServeConfig, pending: Sequence[ModelSpec] = (),
                 tracing: Tracing | None = None):
        names = [m.name for m in models] + [p.name for p in pending]
        if not names:
            raise ValueError("no model to serve")
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        self.config = config
        self.tracing = tracing
        self.metrics = Metrics()
        self.engine = AsyncEngine((), config.max_batch_tokens, config.tokenization_workers, self.metrics.batch)
        for m in models:
            self.watch(self.engine.add(m))
        self.engine.default = names[0]
        self.pending = list(pending)
        self.load_error: str | None = None
        self.on_fatal: Callable[[], None] | None = None  # set by padfree serve: stop when a model cannot load
        self.in_flight = 0
        self.draining = False
        self.routes: set[str] = set()
        self.cpu_info = info.report(cpu.current())  # the CPU profile and its paths (padfree info's): fixed per process

    models = property(lambda self: self.engine.models)

    def trace(self, extra: dict, name: str, start: float, end: float, **attributes) -> None:
        """A finished child span ``name`` of the request's span (``extra``: the request's ASGI state), from
        ``start`` to ``end`` (``time.perf_counter()`` readings); nothing when tracing is off."""
        if self.tracing is not None and extra.get("span") is not None:
            self.tracing.child(extra["span"], name, self.tracing.epoch_ns(start), self.tracing.epoch_ns(end),
                               attributes)

    def watch(self, m: Served) -> None:
        """Export the queue size of a model the engine serves."""
        self.metrics.watch_queue(m.name, lambda name=m.name: self.engine.scheduler.queued(name))

    async def load_pending(self) -> None:
        """Load the models of ``pending`` in order (on a thread each: the server answers meanwhile); the first
        that fails sets ``load_error`` and calls ``on_fatal``."""
        while self.pending:
            spec = self.pending[0]
            try:
                m = await self.engine.load(spec.name, spec.source, spec.dtype, revision=spec.revision,
                                           token=spec.token)
            except Exception as e:  # a bad path, ID, dtype or checkpoint: the server cannot serve what it was told
                named = spec.source if spec.name == spec.source else f"{spec.name}={spec.source}"
                self.load_error = f"--model {named}: {e}"
                log.error("padfree serve: error: %s", self.load_error)
                if self.on_fatal is not None:
                    self.on_fatal()
                return
            self.pending.pop(0)
            self.watch(m)
        log.info("padfree serve: ready: %s", ", ".join(self.models))

    def unready(self) -> str | None:
        """Why the server takes no inference request now (None: it does)."""
        if self.load_error is not None:
            return f"a model failed to load: {self.load_error}"
        if self.draining:
            return "the server is shutting down"
        if self.pending:
            return f"loading model {self.pending[0].name!r} ({len(self.models)} of " \
                   f"{len(self.models) + len(self.pending)} loaded); retry later"
        return None

    def model(self, name: str | None, kind: str | None = None, what: str = "") -> Served:
        """The served model named ``name`` (None: the default), checked to be of ``kind`` (to do ``what``)."""
        try:
            return self.engine.model(name, kind, what)
        except ModelNotFound as e:
            raise ApiError(404, str(e), "NotFound", param="model", code="model_not_found") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="model") from None

    def check_count(self, n: int, field_name: str) -> None:
        if n == 0:
            raise ApiError(422, f"`{field_name}` is empty: give at least one input", "Empty", param=field_name)
        if n > self.config.max_client_batch_size:
            raise ApiError(413, f"`{field_name}` has {n} inputs, more than the limit of "
                                f"{self.config.max_client_batch_size} per request (--max-client-batch-size)",
                           param=field_name)

    async def tokenize(self, request: Request, m: Served, fn, *args, **kwargs) -> list[Seq]:
        """``fn(*args, **kwargs)`` on the engine's tokenization pool; ValueError -> 413/422 naming the problem."""
        t0 = time.perf_counter()
        try:
            seqs = await self.engine.prepare(fn, *args, **kwargs)
        except ValueError as e:
            raise ApiError(413 if isinstance(e, InputTooLong) else 422, str(e)) from None
        t1 = time.perf_counter()
        request.state.tokenization_s = t1 - t0
        self.metrics.tokenization_seconds.labels(m.name).observe(request.state.tokenization_s)
        self.trace(request.scope["state"], "tokenize", t0, t1, **{"padfree.model": m.name,
                                                                   "padfree.inputs": len(seqs)})
        return seqs

    async def run(self, request: Request, m: Served, seqs: list[Seq]) -> list[np.ndarray]:
        """The rows of ``seqs`` through the engine's scheduler; a client that leaves first is dropped (its
        sequences not yet batched are never computed)."""
        request.state.model = m.name
        request.state.texts = len(seqs)
        request.state.tokens = sum(len(q.ids) for q in seqs)
        ticket = self.engine.submit(m, seqs)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({ticket.future, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not ticket.future.done():
            self.metrics.skipped.labels(m.name).inc(len(ticket.items) - ticket.next)
            ticket.cancel()
            request.state.gone = True
            raise _ClientGone()
        self.metrics.queue_seconds.labels(m.name).observe(ticket.queue_s)
        self.metrics.inference_seconds.labels(m.name).observe(ticket.inference_s)
        request.state.queue_s, request.state.inference_s = ticket.queue_s, ticket.inference_s
        ran = request.state.ran = time.perf_counter()
        started = ticket.started or ran
        self.trace(request.scope["state"], "queue", ticket.submitted, started, **{"padfree.model": m.name})
        self.trace(request.scope["state"], "inference", started, ran,
                   **{"padfree.model": m.name, "padfree.sequences": len(seqs),
                      "padfree.tokens": request.state.tokens, "padfree.forward_seconds": ticket.inference_s})
        try:
            return ticket.future.result()
        except Exception as e:
            log.error("inference failed on model %s: %r", m.name, e)
            raise ApiError(500, f"inference failed: {type(e).__name__}: {e}", "Backend") from None


class _ClientGone(Exception):
    """The client disconnected; nothing is sent."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _timing_headers(request: Request, t0: float, characters: int = 0) -> dict[str, str]:
    st = request.state
    ms = lambda x: str(int(round(x * 1e3)))  # noqa: E731
    return {"x-compute-time": ms(time.perf_counter() - t0), "x-total-time": ms(time.perf_counter() - t0),
            "x-tokenization-time": ms(getattr(st, "tokenization_s", 0.0)),
            "x-queue-time": ms(getattr(st, "queue_s", 0.0)),
            "x-inference-time": ms(getattr(st, "inference_s", 0.0)),
            "x-compute-tokens": str(getattr(st, "tokens", 0)), "x-compute-characters": str(characters)}


def _side(direction: str) -> str:
    return direction.lower()


def _texts(inputs: str | list[str]) -> list[str]:
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    for i, t in enumerate(texts):
        if not t:
            raise ApiError(422, f"input {i} is an empty string", "Empty", param="input")
    return texts


def _prompt(m: Served, prompt_name: str | None) -> str | None:
    try:
        return m.pipeline.text.resolve_prompt(prompt_name=prompt_name)
    except ValueError as e:
        raise ApiError(422, str(e), param="prompt_name") from None


def _embed_options(m: Served, normalize: bool | None, dimensions: int | None) -> dict:
    """The embedding output a request asks for (``normalize`` None: the directory's); 422 naming a bad one."""
    try:
        return m.pipeline.output_options(normalize, dimensions)
    except ValueError as e:
        raise ApiError(422, str(e), param="dimensions") from None


def _encoded(rows: np.ndarray, encoding: str) -> list:
    """Vectors ``[N, D]`` as a route sends them: ``float`` lists, ``base64`` of their float32 bytes
    (little-endian), or quantized lists (:func:`padfree.quantize.quantize`: int8, uint8, binary, ubinary)."""
    if encoding == "float":
        return rows.tolist()
    if encoding == "base64":
        return [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in rows]
    return quantize(rows, encoding).tolist()


def _state(request: Request) -> ServerState:
    return request.app.state.padfree


def _truncate(state: ServerState, truncate: bool | None) -> bool:
    return state.config.auto_truncate if truncate is None else truncate


# ---------------------------------------------------------------------- OpenAI
async def openai_embeddings(body: s.OpenAIEmbeddingRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "embed", "embeddings")
    inp = body.input
    if isinstance(inp, list) and inp and isinstance(inp[0], int):
        inp = [inp]  # one sequence of token ids
    state.check_count(len(inp) if isinstance(inp, list) else 1, "input")
    options = {"adapter": body.task, **_embed_options(m, None, body.dimensions)}
    if isinstance(inp, list) and isinstance(inp[0], list):
        for i, ids in enumerate(inp):
            if not ids:
                raise ApiError(422, f"input {i} is an empty list of token ids", param="input")
        seqs = await state.tokenize(request, m, m.pipeline.prepare_ids, inp, state.config.auto_truncate, **options)
    else:
        seqs = await state.tokenize(request, m, m.pipeline.prepare, _texts(inp), state.config.auto_truncate,
                                    **options)
    data = _encoded(np.stack(await state.run(request, m, seqs)), body.encoding_format)
    n = request.state.tokens
    out = {"object": "list", "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n},
           "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
    return _json(out, _timing_headers(request, t0))


async def openai_models(request: Request):
    return _json({"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                              "owned_by": "padfree"} for m in _state(request).models.values()]})


# ---------------------------------------------------------------------- TEI
async def tei_embed(body: s.EmbedRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "embed", "embeddings")
    chunked = body.chunks is not None or body.chunk_tokens is not None
    texts, seqs, rows = await _embed_rows(state, request, m, body, chunks=body.chunks,
                                          chunk_tokens=body.chunk_tokens,
                                          **_embed_options(m, body.normalize, body.dimensions))
    if chunked:  # late chunking: per document its chunks' vectors and their character spans
        out = [{"embeddings": r.tolist(), "spans": [list(span) for span in q.chunks.spans]}
               for q, r in zip(seqs, rows)]
    else:
        out = [r.tolist() for r in rows]
    return _json(out, _timing_headers(request, t0, sum(map(len, texts))))


async def tei_embed_all(body: s.EmbedAllRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "embed", "embeddings")
    texts, _, rows = await _embed_rows(state, request, m, body, tokens=True)
    return _json([r.tolist() for r in rows], _timing_headers(request, t0, sum(map(len, texts))))


async def _embed_rows(state: ServerState, request: Request, m: Served, body: s.EmbedAllRequest, **options):
    """(texts, sequences, one row per text) of /embed and /embed_all, ``options`` those of the pipeline's
    ``prepare``."""
    texts = _texts(body.inputs)
    state.check_count(len(texts), "inputs")
    seqs = await state.tokenize(request, m, m.pipeline.prepare, texts, _truncate(state, body.truncate),
                                _side(body.truncation_direction), _prompt(m, body.prompt_name), adapter=body.task,
                                **options)
    return texts, seqs, await state.run(request, m, seqs)


async def tei_rerank(body: s.RerankRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "classify", "reranking")
    scores = await _rerank(state, request, m, body.query, body.texts, "texts", body.truncate,
                           _side(body.truncation_direction), body.raw_scores)
    order = np.argsort(-scores, kind="stable")
    out = [{"index": int(i), "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
           for i in order]
    return _json(out, _timing_headers(request, t0))


async def _rerank(state: ServerState, request: Request, m: Served, query: str, texts: list[str], field_name: str,
                  truncate: bool | None, side: str, raw: bool, max_tokens: int | None = None) -> np.ndarray:
    """Scores ``[N]`` of (query, text) pairs: the checkpoint's activation, or the raw logits; each text cut to
    ``max_tokens`` tokens first where given."""
    try:
        m.pipeline.check_reranker(m.name)
    except ValueError as e:
        raise ApiError(400, str(e), param="model") from None
    if not query:
        raise ApiError(422, "`query` is an empty string", "Empty", param="query")
    state.check_count(len(texts), field_name)
    for i, t in enumerate(texts):
        if not t:
            raise ApiError(422, f"`{field_name}` {i} is an empty string", "Empty", param=field_name)
    if max_tokens is not None:
        texts = await state.engine.prepare(_cut_tokens, m.pipeline.tokenizer, texts, max_tokens)
    seqs = await state.tokenize(request, m, m.pipeline.prepare, [query] * len(texts), texts,
                                _truncate(state, truncate), side, output="logits" if raw else "scores")
    return np.stack(await state.run(request, m, seqs))[:, 0]


async def tei_predict(body: s.PredictRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    single, out = await _predict(state, request, body, "logits" if body.raw_scores else "probabilities")
    return _json(out[0] if single else out, _timing_headers(request, t0))


async def _predict(state: ServerState, request: Request, body: s.PredictRequest, output: str,
                   function: str | None = None) -> tuple[bool, list]:
    """(one input given?, per input its labels and scores, best first) of /predict's body; ``function``
    (softmax, sigmoid) applied to the logits instead of the checkpoint's own ``output``."""
    m = state.model(body.model, "classify", "classification")
    inp = body.inputs
    single = isinstance(inp, str) or (len(inp) == 2 and all(isinstance(x, str) for x in inp))
    items = [inp] if single else list(inp)
    state.check_count(len(items), "inputs")
    texts, pairs = [], []
    for i, x in enumerate(items):
        x = [x] if isinstance(x, str) else x
        if len(x) not in (1, 2) or not all(x):
            raise ApiError(422, f"input {i} must be a non-empty text or a pair of non-empty texts", param="inputs")
        texts.append(x[0])
        pairs.append(x[1] if len(x) == 2 else None)
    has_pairs = [p is not None for p in pairs]
    if any(has_pairs) and not all(has_pairs):
        raise ApiError(422, "mix of single texts and pairs in one request; send one kind", param="inputs")
    seqs = await state.tokenize(request, m, m.pipeline.prepare, texts, pairs if all(has_pairs) else None,
                                _truncate(state, body.truncate), _side(body.truncation_direction),
                                output="logits" if function else output)
    rows = await state.run(request, m, seqs)
    if function == "softmax":
        rows = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in rows]
    elif function == "sigmoid":
        rows = [1 / (1 + np.exp(-r)) for r in rows]
    labels = m.pipeline.id2label
    return single, [[{"score": float(p[j]), "label": labels[j]} for j in np.argsort(-p, kind="stable")]
                    for p in rows]


async def tei_embed_sparse(body: s.EmbedSparseRequest, request: Request):
    """SPLADE vectors: per input, its non-zero vocabulary weights as ``{"index", "value"}``."""
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "sparse", "sparse embeddings")
    texts = _texts(body.inputs)
    state.check_count(len(texts), "inputs")
    seqs = await state.tokenize(request, m, m.pipeline.prepare, texts, _truncate(state, body.truncate),
                                _side(body.truncation_direction), _prompt(m, body.prompt_name))
    rows = await state.run(request, m, seqs)
    out = [[{"index": i, "value": v} for i, v in zip(idx.tolist(), val.tolist())] for idx, val in rows]
    return _json(out, _timing_headers(request, t0, sum(map(len, texts))))


async def tei_tokenize(body: s.TokenizeRequest, request: Request):
    state = _state(request)
    m = state.model(body.model)
    texts = _texts(body.inputs)
    state.check_count(len(texts), "inputs")
    prompt = _prompt(m, body.prompt_name) if m.pipeline.kind == "embed" else None
    full = [(prompt or "") + t for t in texts]
    tokenizer = m.pipeline.tokenizer
    encodings = await state.engine.prepare(tokenizer.encode, full, add_special_tokens=body.add_special_tokens)
    special = tokenizer.special_ids
    out = []
    for text, e in zip(full, encodings):
        toks = []
        for tid, tok, (a, b) in zip(e.ids, e.tokens, e.offsets):
            sp = tid in special
            toks.append({"id": tid, "text": tok if sp else text[a:b], "special": sp,
                         "start": None if sp else a, "stop": None if sp else b})
        out.append(toks)
    return _json(out)


async def tei_info(request: Request, model: str | None = None):
    state = _state(request)
    m = state.model(model)
    p = m.pipeline
    if p.kind == "embed":
        model_type = {"embedding": {"pooling": ",".join(p.pooling)}}
    elif p.kind == "sparse":
        model_type = {"embedding": {"pooling": "splade"}}  # as TEI reports a SPLADE model
    elif p.num_labels == 1:
        model_type = {"reranker": {"id2label": dict(enumerate(p.id2label))}}
    else:
        model_type = {"classifier": {"id2label": dict(enumerate(p.id2label))}}
    c = state.config
    return _json({"model_id": m.name, "model_sha": None, "model_source": m.source,
                  "model_dtype": str(p.dtype).replace("torch.", ""), "model_type": model_type,
                  "max_concurrent_requests": c.max_concurrent_requests, "max_input_length": p.max_input_length,
                  "max_batch_tokens": c.max_batch_tokens, "max_batch_requests": None,
                  "max_client_batch_size": c.max_client_batch_size, "auto_truncate": c.auto_truncate,
                  "tokenization_workers": c.tokenization_workers, "version": __version__,
                  "models": sorted(state.models), "cpu": state.cpu_info})


async def health(request: Request):
    """Liveness: 200 while the process serves (loading and draining included), 503 when a loaded model cannot
    run (its last batch failed, and a tiny probe fails too)."""
    state = _state(request)
    for m in list(state.models.values()):
        if m.last_error is None and time.perf_counter() - m.last_ok < HEALTH_FRESH_S:
            continue
        # nothing ran lately, or the last batch failed: prove the model runs on a tiny input
        ticket = state.engine.submit(m, m.pipeline.prepare(["health"], truncate=True))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(ticket.future), 30)
        if m.last_error is not None:
            raise ApiError(503, f"model {m.name!r} cannot run: {m.last_error}", "Unhealthy")
    return Response(status_code=200)


async def ready(request: Request):
    """Readiness: 200 once every model is loaded and warmed up, 503 naming why not (loading, a model that
    failed to load, draining after SIGTERM)."""
    reason = _state(request).unready()
    if reason is not None:
        raise ApiError(503, reason, "Unhealthy")
    return _json({"status": "ready", "models": sorted(_state(request).models)})


async def metrics(request: Request):
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- Cohere / Jina
async def cohere_rerank(body: s.CohereRerankRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "classify", "reranking")
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    scores = await _rerank(state, request, m, body.query, docs, "documents", body.truncate, "right", False)
    order = np.argsort(-scores, kind="stable")[:body.top_n]
    results = [{"index": int(i), "relevance_score": float(scores[i]),
                **({"document": {"text": docs[i]}} if body.return_documents else {})} for i in order]
    return _json({"id": str(uuid.uuid4()), "model": m.name, "results": results,
                  "usage": {"total_tokens": request.state.tokens}}, _timing_headers(request, t0))


# ---------------------------------------------------------------------- Cohere v2 (cohere.ClientV2)
# Cohere's input types -> the prompt names a sentence-transformers model may have for them, in order
_INPUT_PROMPTS = {"search_query": ("search_query", "query"),
                  "search_document": ("search_document", "document", "passage"),
                  "classification": ("classification",), "clustering": ("clustering",)}


def _input_prompt(m: Served, input_type: str | None) -> str | None:
    """The model's prompt for a Cohere ``input_type`` (None where the model has none for it)."""
    if input_type is None:
        return None
    names = _INPUT_PROMPTS.get(input_type)
    if names is None:
        raise ApiError(422, f"input_type {input_type!r} is not one of {', '.join(_INPUT_PROMPTS)}",
                       param="input_type")
    prompts = m.pipeline.text.prompts or {}
    return next((prompts[n] for n in names if n in prompts), None)


def _cut_tokens(tokenizer, texts: list[str], n: int, side: str = "right") -> list[str]:
    """Each text cut to ``n`` of its tokens (special tokens not counted) on ``side``, at a character boundary."""
    out = []
    for text, e in zip(texts, tokenizer.encode(texts, add_special_tokens=False)):
        if len(e.offsets) <= n:
            out.append(text)
        else:
            out.append(text[:e.offsets[n - 1][1]] if side == "right" else text[e.offsets[-n][0]:])
    return out


async def cohere_embed(body: s.CohereEmbedRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "embed", "embeddings")
    texts = _texts(body.texts)
    state.check_count(len(texts), "texts")
    side = "left" if body.truncate == "START" else "right"
    if body.max_tokens is not None:
        texts = await state.engine.prepare(_cut_tokens, m.pipeline.tokenizer, texts, body.max_tokens, side)
    seqs = await state.tokenize(request, m, m.pipeline.prepare, texts, body.truncate != "NONE", side,
                                _input_prompt(m, body.input_type), **_embed_options(m, None, body.output_dimension))
    rows = np.stack(await state.run(request, m, seqs))
    embeddings = {kind: _encoded(rows, kind) for kind in dict.fromkeys(body.embedding_types)}
    return _json({"id": str(uuid.uuid4()), "response_type": "embeddings_by_type", "embeddings": embeddings,
                  "texts": body.texts, "meta": {"api_version": {"version": "2"},
                                                "billed_units": {"input_tokens": request.state.tokens}}},
                 _timing_headers(request, t0, sum(map(len, texts))))


async def cohere_rerank_v2(body: s.CohereV2RerankRequest, request: Request):
    t0, state = time.perf_counter(), _state(request)
    m = state.model(body.model, "classify", "reranking")
    scores = await _rerank(state, request, m, body.query, body.documents, "documents", True, "right", False,
                           body.max_tokens_per_doc)
    order = np.argsort(-scores, kind="stable")[:body.top_n]
    return _json({"id": str(uuid.uuid4()),
                  "results": [{"index": int(i), "relevance_score": float(scores[i])} for i in order],
                  "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}},
                 _timing_headers(request, t0))


# ---------------------------------------------------------------------- TEI's POST / (huggingface_hub's client)
async def tei_compat(request: Request):
    """TEI's ``POST /``: the body of /embed, /embed_sparse, /rerank (a body with ``query``) or /predict, by the
    model's kind, as huggingface_hub's ``InferenceClient(base_url=...)`` sends it (``feature_extraction``,
    ``text_classification`` with its ``parameters``: ``function_to_apply``, ``top_k``). Classification answers
    one list of labels per input, as that client reads it."""
    state = _state(request)
    try:
        data = json.loads(await request.body())
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object, sent with 'Content-Type: application/json'")
    kind = state.model(data.get("model") if isinstance(data.get("model"), str) else None).pipeline.kind
    if kind == "embed":
        return await tei_embed(_validated(s.EmbedRequest, data), request)
    if kind == "sparse":
        return await tei_embed_sparse(_validated(s.EmbedSparseRequest, data), request)
    if "query" in data:
        return await tei_rerank(_validated(s.RerankRequest, data), request)
    t0 = time.perf_counter()
    params = _validated(s.ClassificationParameters, data.get("parameters") or {})
    body = _validated(s.PredictRequest, data)
    function = None if params.function_to_apply in (None, "none") else params.function_to_apply
    output = "logits" if params.function_to_apply == "none" or body.raw_scores else "probabilities"
    single, out = await _predict(state, request, body, output, function)
    return _json([labels[:params.top_k] for labels in out], _timing_headers(request, t0))


def _validated(schema, data: dict):
    """``schema`` of ``data``; a validation error as the routes answer it (422 naming the field)."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None


@dataclass(frozen=True)
class Route:
    path: str
    endpoint: Any
    method: str = "POST"
    tag: str = "text-embeddings-inference"
    response_model: Any = None
    errors: tuple[int, ...] = ()  # documented error statuses (the body is the API's error model)


_OPENAI, _COHERE = "OpenAI", "Cohere / Jina"
ROUTES = (
    Route("/v1/embeddings", openai_embeddings, tag=_OPENAI, response_model=s.OpenAIEmbeddingResponse,
          errors=(400, 413, 422, 429)),
    Route("/v1/models", openai_models, "GET", _OPENAI, s.OpenAIModelList),
    Route("/embed", tei_embed, response_model=list[list[float]] | list[s.ChunkedEmbeddings], errors=(413, 422, 429)),
    Route("/embed_all", tei_embed_all, response_model=list[list[list[float]]], errors=(413, 422)),
    Route("/rerank", tei_rerank, response_model=list[s.Rank], errors=(413, 422)),
    Route("/predict", tei_predict, response_model=list[s.Prediction] | list[list[s.Prediction]], errors=(413, 422)),
    Route("/embed_sparse", tei_embed_sparse, response_model=list[list[s.SparseValue]], errors=(413, 422)),
    Route("/tokenize", tei_tokenize, response_model=list[list[s.SimpleToken]]),
    Route("/info", tei_info, "GET"),
    Route("/health", health, "GET"),
    Route("/ready", ready, "GET", errors=(503,)),
    Route("/metrics", metrics, "GET"),
    Route("/v1/rerank", cohere_rerank, tag=_COHERE, response_model=s.CohereRerankResponse, errors=(413, 422)),
    Route("/v2/embed", cohere_embed, tag=_COHERE, response_model=s.CohereEmbedResponse, errors=(413, 422)),
    Route("/v2/rerank", cohere_rerank_v2, tag=_COHERE, response_model=s.CohereV2RerankResponse, errors=(413, 422)),
    Route("/", tei_compat, errors=(413, 422)),
)


async def _api_error(request: Request, e: ApiError):
    return Response(error_body(request.url.path, e), status_code=e.status, media_type="application/json")


async def _client_gone(request: Request, e: _ClientGone):
    return Response(status_code=499)


async def _validation_error(request: Request, e: RequestValidationError):
    errors = e.errors()
    if errors and errors[0].get("type") == "json_invalid":
        err = ApiError(400, f"the body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}")
    elif errors and tuple(errors[0].get("loc", ())) == ("body",):
        err = ApiError(422, "the body must be a JSON object, sent with 'Content-Type: application/json'")
    else:
        parts = []
        for err in errors[:3]:
            loc = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
            parts.append(f"`{loc}`: {err.get('msg')}")
        param = ".".join(str(x) for x in errors[0].get("loc", ())[1:2]) if errors else None
        err = ApiError(422, "invalid request: " + "; ".join(parts), param=param)
    return await _api_error(request, err)


async def _http_error(request: Request, e: StarletteHTTPException):
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}",
               400: "the body could not be read as JSON (is it valid UTF-8?)"}.get(e.status_code, str(e.detail))
    kind = "NotFound" if e.status_code in (404, 405) else "Validation"
    return await _api_error(request, ApiError(e.status_code, message, kind))


def create_app(models: Sequence[Served] = (), config: ServeConfig | None = None,
               pending: Sequence[ModelSpec] = (), tracing: Tracing | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (loaded) and then ``pending`` (loaded once the app starts, while it
    answers ``/health``, and 503 on ``/ready`` and the inference routes); the first is the default:
    :data:`ROUTES` over one :class:`ServerState`, behind :class:`Guard`. ``tracing``: where request spans go
    (None: nowhere); it is shut down (its buffered spans sent) when the app stops."""
    state = ServerState(models, config or ServeConfig(), pending, tracing)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.engine.scheduler.start()
        loading = asyncio.get_running_loop().create_task(state.load_pending(), name="padfree-load")
        yield
        state.draining = True       # no new inference request; the running ones have finished
        loading.cancel()
        await state.engine.close()
        if tracing is not None:
            tracing.shutdown()

    app = FastAPI(title="padfree serve", version=__version__, lifespan=lifespan,
                  description="Padding-free embeddings, reranking and classification: OpenAI, "
                              "text-embeddings-inference and Cohere-style routes.")
    app.state.padfree = state
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(_ClientGone, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for r in ROUTES:
        error_model = s.OpenAIError if r.path.startswith("/v1/") else s.TEIError
        app.add_api_route(r.path, r.endpoint, methods=[r.method], tags=[r.tag], response_model=r.response_model,
                          responses={code: {"model": error_model} for code in r.errors})
    state.routes = {r.path for r in app.routes}
    app.add_middleware(Guard, state=state)
    return app
