"""The HTTP layer of ``padfree serve``: routes that validate a request, map its shape (OpenAI, TEI, Cohere) onto a
:class:`padfree.tasks.Task`, and map errors onto each API's error body.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, cpu
from ..tasks import ClassifyTask, EmbedTask, Seq, SparseTask, Task
from ..tokenizer import InputTooLong
from . import schemas as s
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .scheduler import BatchStats, Scheduler

log = logging.getLogger("padfree.serve")

# routes that run a model: the in-flight limit and the request log's text/token counts apply to these
INFERENCE_ROUTES = {"/v1/embeddings", "/embed", "/embed_all", "/embed_sparse", "/rerank", "/predict", "/v1/rerank"}
OPEN_ROUTES = {"/health", "/metrics"}  # no API key needed
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
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty")


@dataclass
class Served:
    """One model the server serves: its name, its task and where it came from."""
    name: str
    task: Task
    source: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    last_ok: float = 0.0                   # perf_counter of its last good batch
    last_error: str | None = None          # the last batch's error, until a batch succeeds


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
    """Pure ASGI middleware in front of the routes: API key (constant-time comparison), the in-flight limit
    (429 at once), the payload limit (413 before the body is parsed), and one INFO log line per request."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, path, t0 = self.state, scope["path"], time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(e: ApiError):
            await send_wrapper({"type": "http.response.start", "status": e.status,
                                "headers": [(b"content-type", b"application/json")]})
            await send_wrapper({"type": "http.response.body", "body": error_body(path, e)})

        inference = path in INFERENCE_ROUTES
        scope.setdefault("state", {})
        try:
            if st.config.api_key is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                return await reply(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                            "Unauthorized", code="invalid_api_key"))
            if inference and st.in_flight >= st.config.max_concurrent_requests:
                return await reply(ApiError(429, f"model is overloaded: {st.in_flight} requests in flight, the "
                                                 f"limit is {st.config.max_concurrent_requests} "
                                                 "(--max-concurrent-requests); retry later", "Overloaded",
                                            code="rate_limit_exceeded"))
            if st.draining and inference:
                return await reply(ApiError(503, "the server is shutting down", "Unhealthy"))
            if inference:
                st.in_flight += 1
                st.metrics.in_flight.inc()
            try:
                body = await self._read_body(scope, receive)
                if body is None:
                    return await reply(ApiError(413, f"request body is larger than the payload limit of "
                                                     f"{st.config.payload_limit} bytes (--payload-limit)",
                                                "PayloadTooLarge"))
                await self.app(scope, _replay(body, receive), send_wrapper)
            finally:
                if inference:
                    st.in_flight -= 1
                    st.metrics.in_flight.dec()
        finally:
            code = status["code"]
            extra = scope["state"]
            if extra.get("gone"):
                outcome = "cancelled"
            else:
                outcome = _outcome(code)
                if code >= 400:
                    st.metrics.failures.labels(_FAILURE_KINDS.get(code, "backend" if code >= 500 else
                                                                  "validation")).inc()
            route = path if path in st.routes else "other"
            st.metrics.requests.labels(route, outcome).inc()
            log.info("%s %s %s %s texts=%s tokens=%s %.1fms", scope["method"], path, code,
                     scope["state"].get("model", "-"), extra.get("texts", "-"), extra.get("tokens", "-"),
                     (time.perf_counter() - t0) * 1e3)

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
    def __init__(self, models: Sequence[Served], config: ServeConfig):
        if not models:
            raise ValueError("no model to serve")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique; got {names}")
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.max_batch_tokens, on_batch=self._on_batch)
        for m in models:
            self.scheduler.add_queue(m.name, m.task.run)
            self.metrics.watch_queue(m.name, lambda name=m.name: self.scheduler.queued(name))
        self.tokenizers = ThreadPoolExecutor(config.tokenization_workers, thread_name_prefix="padfree-tokenize")
        self.in_flight = 0
        self.draining = False
        self.routes: set[str] = set()

    def _on_batch(self, stats: BatchStats) -> None:
        self.metrics.batch(stats)
        m = self.models[stats.queue]
        if stats.error is None:
            m.last_ok, m.last_error = time.perf_counter(), None
        else:
            m.last_error = f"{type(stats.error).__name__}: {stats.error}"

    def model(self, name: str | None, need: type | None = None, what: str = "") -> Served:
        """The served model named ``name`` (None: the default), checked to be able to do ``what``."""
        m = self.models.get(name or self.default)
        if m is None:
            raise ApiError(404, f"model {name!r} is not served; served models: {sorted(self.models)}", "NotFound",
                           param="model", code="model_not_found")
        if need is not None and not isinstance(m.task, need):
            can = {"embed": "embeddings", "classify": "classification and reranking",
                   "sparse": "sparse embeddings (/embed_sparse)"}[m.task.kind]
            raise ApiError(400, f"model {m.name!r} cannot do {what}: it serves {can}", param="model")
        return m

    def check_count(self, n: int, field_name: str) -> None:
        if n == 0:
            raise ApiError(422, f"`{field_name}` is empty: give at least one input", "Empty", param=field_name)
        if n > self.config.max_client_batch_size:
            raise ApiError(413, f"`{field_name}` has {n} inputs, more than the limit of "
                                f"{self.config.max_client_batch_size} per request (--max-client-batch-size)",
                           param=field_name)

    async def tokenize(self, request: Request, m: Served, fn, *args, **kwargs) -> list[Seq]:
        """``fn(*args, **kwargs)`` on the tokenization pool; ValueError -> 413/422 naming the problem."""
        t0 = time.perf_counter()
        try:
            seqs = await asyncio.get_running_loop().run_in_executor(self.tokenizers, lambda: fn(*args, **kwargs))
        except ValueError as e:
            raise ApiError(413 if isinstance(e, InputTooLong) else 422, str(e)) from None
        request.state.tokenization_s = time.perf_counter() - t0
        self.metrics.tokenization_seconds.labels(m.name).observe(request.state.tokenization_s)
        return seqs

    async def run(self, request: Request, m: Served, seqs: list[Seq]) -> list[np.ndarray]:
        """The rows of ``seqs`` through the scheduler; a client that leaves first is dropped (its sequences
        not yet batched are never computed)."""
        request.state.model = m.name
        request.state.texts = len(seqs)
        request.state.tokens = sum(len(q.ids) for q in seqs)
        ticket = self.scheduler.submit(m.name, seqs, [len(q.ids) for q in seqs])
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


def _prompt(task: EmbedTask | SparseTask, prompt_name: str | None) -> str | None:
    try:
        return task.st.resolve_prompt(prompt_name=prompt_name)
    except ValueError as e:
        raise ApiError(422, str(e), param="prompt_name") from None


def _truncate_dims(vectors: np.ndarray, dimensions: int | None, dim: int, renormalize: bool) -> np.ndarray:
    """Matryoshka: the first ``dimensions`` dims, then unit norm if ``renormalize``."""
    if dimensions is not None:
        if dimensions > dim:
            raise ApiError(422, f"dimensions={dimensions} is more than the model's {dim}", param="dimensions")
        vectors = vectors[:, :dimensions]
    if renormalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors.astype(np.float32, copy=False)


def create_app(models: Sequence[Served], config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``models`` (the first is the default)."""
    state = ServerState(models, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        yield
        state.draining = True       # uvicorn has closed the socket and let running requests finish
        await state.scheduler.stop()
        state.tokenizers.shutdown(wait=False)

    app = FastAPI(title="padfree serve", version=__version__, lifespan=lifespan,
                  description="Padding-free embeddings, reranking and classification: OpenAI, "
                              "text-embeddings-inference and Cohere-style routes.")
    app.state.padfree = state

    # ------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return Response(error_body(request.url.path, e), status_code=e.status, media_type="application/json")

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, e: _ClientGone):
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
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
        return await api_error(request, err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}",
                   400: "the body could not be read as JSON (is it valid UTF-8?)"}.get(e.status_code, str(e.detail))
        kind = "NotFound" if e.status_code in (404, 405) else "Validation"
        return await api_error(request, ApiError(e.status_code, message, kind))

    # ------------------------------------------------------------------ OpenAI
    @app.post("/v1/embeddings", response_model=s.OpenAIEmbeddingResponse, tags=["OpenAI"],
              responses={400: {"model": s.OpenAIError}, 413: {"model": s.OpenAIError},
                         422: {"model": s.OpenAIError}, 429: {"model": s.OpenAIError}})
    async def openai_embeddings(body: s.OpenAIEmbeddingRequest, request: Request):
        t0 = time.perf_counter()
        m = state.model(body.model, EmbedTask, "embeddings")
        task: EmbedTask = m.task
        inp = body.input
        if isinstance(inp, list) and inp and isinstance(inp[0], int):
            inp = [inp]  # one sequence of token ids
        state.check_count(len(inp) if isinstance(inp, list) else 1, "input")
        truncate = state.config.auto_truncate
        if isinstance(inp, list) and isinstance(inp[0], list):
            for i, ids in enumerate(inp):
                if not ids:
                    raise ApiError(422, f"input {i} is an empty list of token ids", param="input")
            seqs = await state.tokenize(request, m, task.from_ids, inp, truncate, task=body.task)
        else:
            seqs = await state.tokenize(request, m, task.tokenize, _texts(inp), truncate, task=body.task)
        rows = await state.run(request, m, seqs)
        vectors = _truncate_dims(np.stack(rows), body.dimensions, task.dimension, renormalize=task.normalizes)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        n = request.state.tokens
        out = {"object": "list", "model": m.name, "usage": {"prompt_tokens": n, "total_tokens": n},
               "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)]}
        return _json(out, _timing_headers(request, t0))

    @app.get("/v1/models", response_model=s.OpenAIModelList, tags=["OpenAI"])
    async def openai_models():
        return _json({"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                                  "owned_by": "padfree"} for m in state.models.values()]})

    # ------------------------------------------------------------------ TEI
    @app.post("/embed", response_model=list[list[float]] | list[s.ChunkedEmbeddings],
              tags=["text-embeddings-inference"],
              responses={413: {"model": s.TEIError}, 422: {"model": s.TEIError}, 429: {"model": s.TEIError}})
    async def tei_embed(body: s.EmbedRequest, request: Request):
        t0 = time.perf_counter()
        m, texts, rows = await _tei_rows(body, request, tokens=False, chunks=body.chunks,
                                         chunk_tokens=body.chunk_tokens)
        if body.chunks is not None or body.chunk_tokens is not None:  # late chunking: rows are (vectors, spans)
            out = [{"embeddings": _truncate_dims(v, body.dimensions, m.task.dimension, body.normalize).tolist(),
                    "spans": spans} for v, spans in rows]
            return _json(out, _timing_headers(request, t0, sum(map(len, texts))))
        vectors = _truncate_dims(np.stack(rows), body.dimensions, m.task.dimension, renormalize=body.normalize)
        return _json(vectors.tolist(), _timing_headers(request, t0, sum(map(len, texts))))

    @app.post("/embed_all", response_model=list[list[list[float]]], tags=["text-embeddings-inference"],
              responses={413: {"model": s.TEIError}, 422: {"model": s.TEIError}})
    async def tei_embed_all(body: s.EmbedAllRequest, request: Request):
        t0 = time.perf_counter()
        _, texts, rows = await _tei_rows(body, request, tokens=True)
        return _json([r.tolist() for r in rows], _timing_headers(request, t0, sum(map(len, texts))))

    async def _tei_rows(body: s.EmbedAllRequest, request: Request, tokens: bool, **chunking):
        """(model, texts, one row per text) for /embed (pooled vectors) and /embed_all (every token's); with
        ``chunks`` / ``chunk_tokens``, each row is (``[n_chunks, D]`` vectors, their character spans)."""
        m = state.model(body.model, EmbedTask, "embeddings")
        texts = _texts(body.inputs)
        state.check_count(len(texts), "inputs")
        truncate = state.config.auto_truncate if body.truncate is None else body.truncate
        seqs = await state.tokenize(request, m, m.task.tokenize, texts, truncate, _side(body.truncation_direction),
                                    _prompt(m.task, body.prompt_name), tokens=tokens, task=body.task, **chunking)
        rows = await state.run(request, m, seqs)
        if any(q.chunks is not None for q in seqs):
            rows = [(r, [list(span) for span in q.chunks.spans]) for q, r in zip(seqs, rows)]
        return m, texts, rows

    @app.post("/rerank", response_model=list[s.Rank], tags=["text-embeddings-inference"],
              responses={413: {"model": s.TEIError}, 422: {"model": s.TEIError}})
    async def tei_rerank(body: s.RerankRequest, request: Request):
        t0 = time.perf_counter()
        m = state.model(body.model, ClassifyTask, "reranking")
        scores = await _rerank(request, m, body.query, body.texts, "texts", body.truncate,
                               _side(body.truncation_direction), body.raw_scores)
        order = np.argsort(-scores, kind="stable")
        out = [{"index": int(i), "score": float(scores[i]), **({"text": body.texts[i]} if body.return_text else {})}
               for i in order]
        return _json(out, _timing_headers(request, t0))

    async def _rerank(request, m: Served, query: str, texts: list[str], field_name: str, truncate, side,
                      raw: bool) -> np.ndarray:
        if m.task.num_labels != 1:
            raise ApiError(400, f"model {m.name!r} has {m.task.num_labels} labels; reranking needs one score",
                           param="model")
        if not query:
            raise ApiError(422, "`query` is an empty string", "Empty", param="query")
        state.check_count(len(texts), field_name)
        for i, t in enumerate(texts):
            if not t:
                raise ApiError(422, f"`{field_name}` {i} is an empty string", "Empty", param=field_name)
        truncate = state.config.auto_truncate if truncate is None else truncate
        seqs = await state.tokenize(request, m, m.task.tokenize, [query] * len(texts), texts, truncate, side)
        rows = await state.run(request, m, seqs)
        return m.task.scores(np.stack(rows), raw)

    @app.post("/predict", tags=["text-embeddings-inference"],
              response_model=list[s.Prediction] | list[list[s.Prediction]],
              responses={413: {"model": s.TEIError}, 422: {"model": s.TEIError}})
    async def tei_predict(body: s.PredictRequest, request: Request):
        t0 = time.perf_counter()
        m = state.model(body.model, ClassifyTask, "classification")
        inp = body.inputs
        single = isinstance(inp, str) or (len(inp) == 2 and all(isinstance(x, str) for x in inp))
        items = [inp] if single else list(inp)
        state.check_count(len(items), "inputs")
        texts, pairs = [], []
        for i, x in enumerate(items):
            x = [x] if isinstance(x, str) else x
            if len(x) not in (1, 2) or not all(x):
                raise ApiError(422, f"input {i} must be a non-empty text or a pair of non-empty texts",
                               param="inputs")
            texts.append(x[0])
            pairs.append(x[1] if len(x) == 2 else None)
        has_pairs = [p is not None for p in pairs]
        if any(has_pairs) and not all(has_pairs):
            raise ApiError(422, "mix of single texts and pairs in one request; send one kind", param="inputs")
        truncate = state.config.auto_truncate if body.truncate is None else body.truncate
        seqs = await state.tokenize(request, m, m.task.tokenize, texts, pairs if all(has_pairs) else None,
                                    truncate, _side(body.truncation_direction))
        probs = m.task.probabilities(np.stack(await state.run(request, m, seqs)), body.raw_scores)
        labels = m.task.id2label
        out = [[{"score": float(p[j]), "label": labels[j]} for j in np.argsort(-p, kind="stable")] for p in probs]
        return _json(out[0] if single else out, _timing_headers(request, t0))

    @app.post("/embed_sparse", response_model=list[list[s.SparseValue]], tags=["text-embeddings-inference"],
              responses={413: {"model": s.TEIError}, 422: {"model": s.TEIError}})
    async def tei_embed_sparse(body: s.EmbedSparseRequest, request: Request):
        """SPLADE vectors: per input, its non-zero vocabulary weights as ``{"index", "value"}``."""
        t0 = time.perf_counter()
        m = state.model(body.model, SparseTask, "sparse embeddings")
        texts = _texts(body.inputs)
        state.check_count(len(texts), "inputs")
        truncate = state.config.auto_truncate if body.truncate is None else body.truncate
        seqs = await state.tokenize(request, m, m.task.tokenize, texts, truncate, _side(body.truncation_direction),
                                    _prompt(m.task, body.prompt_name))
        rows = await state.run(request, m, seqs)
        out = [[{"index": i, "value": v} for i, v in zip(idx.tolist(), val.tolist())] for idx, val in rows]
        return _json(out, _timing_headers(request, t0, sum(map(len, texts))))

    @app.post("/tokenize", response_model=list[list[s.SimpleToken]], tags=["text-embeddings-inference"])
    async def tei_tokenize(body: s.TokenizeRequest, request: Request):
        m = state.model(body.model)
        texts = _texts(body.inputs)
        state.check_count(len(texts), "inputs")
        prompt = _prompt(m.task, body.prompt_name) if isinstance(m.task, EmbedTask) else None
        full = [(prompt or "") + t for t in texts]
        encodings = await asyncio.get_running_loop().run_in_executor(
            state.tokenizers, lambda: m.task.tokenizer.encode(full, add_special_tokens=body.add_special_tokens))
        special = m.task.tokenizer.special_ids
        out = []
        for text, e in zip(full, encodings):
            toks = []
            for tid, tok, (a, b) in zip(e.ids, e.tokens, e.offsets):
                sp = tid in special
                toks.append({"id": tid, "text": tok if sp else text[a:b], "special": sp,
                             "start": None if sp else a, "stop": None if sp else b})
            out.append(toks)
        return _json(out)

    cpu_info = cpu.report(cpu.current())  # the CPU profile and its paths (padfree info's report): fixed for the process

    @app.get("/info", tags=["text-embeddings-inference"])
    async def tei_info(model: str | None = None):
        m = state.model(model)
        task = m.task
        if isinstance(task, EmbedTask):
            model_type = {"embedding": {"pooling": ",".join(task.st.pooling)}}
        elif isinstance(task, SparseTask):
            model_type = {"embedding": {"pooling": "splade"}}  # as TEI reports a SPLADE model
        elif task.num_labels == 1:
            model_type = {"reranker": {"id2label": dict(enumerate(task.id2label))}}
        else:
            model_type = {"classifier": {"id2label": dict(enumerate(task.id2label))}}
        c = state.config
        return _json({"model_id": m.name, "model_sha": None, "model_source": m.source,
                      "model_dtype": str(task.dtype).replace("torch.", ""), "model_type": model_type,
                      "max_concurrent_requests": c.max_concurrent_requests, "max_input_length": task.max_input_length,
                      "max_batch_tokens": c.max_batch_tokens, "max_batch_requests": None,
                      "max_client_batch_size": c.max_client_batch_size, "auto_truncate": c.auto_truncate,
                      "tokenization_workers": c.tokenization_workers, "version": __version__,
                      "models": sorted(state.models), "cpu": cpu_info})

    @app.get("/health", tags=["text-embeddings-inference"])
    async def health():
        for m in state.models.values():
            if m.last_error is None and time.perf_counter() - m.last_ok < HEALTH_FRESH_S:
                continue
            # nothing ran lately, or the last batch failed: prove the model runs on a tiny input
            probe = m.task.tokenize(["health"], truncate=True)
            ticket = state.scheduler.submit(m.name, probe, [len(q.ids) for q in probe])
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(ticket.future), 30)
            if m.last_error is not None:
                raise ApiError(503, f"model {m.name!r} cannot run: {m.last_error}", "Unhealthy")
        return Response(status_code=200)

    @app.get("/metrics", tags=["text-embeddings-inference"])
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ Cohere / Jina
    @app.post("/v1/rerank", response_model=s.CohereRerankResponse, tags=["Cohere / Jina"],
              responses={413: {"model": s.OpenAIError}, 422: {"model": s.OpenAIError}})
    async def cohere_rerank(body: s.CohereRerankRequest, request: Request):
        t0 = time.perf_counter()
        m = state.model(body.model, ClassifyTask, "reranking")
        docs = [d if isinstance(d, str) else d.text for d in body.documents]
        scores = await _rerank(request, m, body.query, docs, "documents", body.truncate, "right", False)
        order = np.argsort(-scores, kind="stable")[:body.top_n]
        results = [{"index": int(i), "relevance_score": float(scores[i]),
                    **({"document": {"text": docs[i]}} if body.return_documents else {})} for i in order]
        return _json({"id": str(uuid.uuid4()), "model": m.name, "results": results,
                      "usage": {"total_tokens": request.state.tokens}}, _timing_headers(request, t0))

    state.routes = {r.path for r in app.routes}
    app.add_middleware(Guard, state=state)
    return app
