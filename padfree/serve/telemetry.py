"""Tracing and structured logs of ``padfree serve``: OpenTelemetry spans sent over OTLP (:class:`Tracing`), one JSON
object per log line (:class:`JsonFormatter`, :func:`configure_logging`) and the id of each request
(:func:`request_id`).

Tracing is off unless asked for: the server then holds ``None`` instead of a :class:`Tracing` and skips every call,
so a request costs one ``is None`` test. The OpenTelemetry SDK and its OTLP exporters (the ``otel`` extra) are
imported by :meth:`Tracing.start` only; the rest of this module is the standard library, so that ``--json-logs``
and the request id work without the extra.

Spans of one request, all on one clock (``time.perf_counter`` readings turned into epoch nanoseconds by
:meth:`Tracing.epoch_ns`, with one offset per :class:`Tracing`)::

    POST /v1/embeddings   SERVER   (parent: the client's W3C traceparent, when it sent one)
    ├── tokenize          INTERNAL
    ├── queue             INTERNAL
    ├── inference         INTERNAL
    └── postprocess       INTERNAL

The request span is a ``with`` block (:meth:`Tracing.request`); its children are made finished, with the times the
server measured (:meth:`Tracing.child`), since the queue and inference times come from the scheduler's ticket.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import secrets
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # the otel extra; imported at run time by Tracing.start only
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

PROTOCOLS = ("http/protobuf", "grpc")
TRACES_PATH = "/v1/traces"              # appended to an http/protobuf base URL, as OTEL_EXPORTER_OTLP_ENDPOINT's
INSTALL_HINT = "pip install 'padfree[otel]'"

# attribute names (OpenTelemetry's HTTP semantic conventions, then padfree's own)
HTTP_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
URL_PATH = "url.path"
HTTP_STATUS = "http.response.status_code"  # set by the server at the end; 5xx makes the request span an error

_TRACE_HEADERS = (b"traceparent", b"tracestate")
_REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_MAX = 128                   # characters of an incoming x-request-id kept; a longer one is replaced


class Tracing:
    """One server's tracing: its own TracerProvider (never the global one, so that two servers can live in one
    process) with a BatchSpanProcessor sending to an OTLP endpoint. Make it with :meth:`start`, end it with
    :meth:`shutdown` (which sends what is buffered)."""

    def __init__(self, provider: TracerProvider, endpoint: str, protocol: str):
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        from opentelemetry.context import Context

        self.provider, self.endpoint, self.protocol = provider, endpoint, protocol
        self._tracer = provider.get_tracer("padfree.serve")
        self._propagator = TraceContextTextMapPropagator()
        self._server, self._error = SpanKind.SERVER, Status(StatusCode.ERROR)
        self._in_context, self._empty = set_span_in_context, Context
        self._offset_ns = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch, taken once

    @classmethod
    def start(cls, endpoint: str, protocol: str = "http/protobuf", service_name: str = "padfree",
              attributes: Mapping[str, str] | None = None) -> "Tracing":
        """Tracing to the OTLP collector at ``endpoint``.

        ``protocol`` "http/protobuf": ``endpoint`` is a base URL (``http://collector:4318``) to which ``/v1/traces``
        is appended, as for ``OTEL_EXPORTER_OTLP_ENDPOINT``; a URL whose path already ends in ``/v1/traces`` is
        used as it is. "grpc": ``host:port`` or ``http://host:port`` (plaintext), ``https://host:port`` (TLS).
        The resource is ``service.name`` = ``service_name``, ``service.version`` = padfree's version, then
        ``attributes`` (and ``OTEL_RESOURCE_ATTRIBUTES``). Headers, timeouts, certificates, the batch processor's
        delays and the sampler come from the standard ``OTEL_*`` variables. ``ValueError`` for an unknown
        protocol or an empty endpoint, ``ImportError`` naming the extra when OpenTelemetry is not installed."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown OTLP protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not endpoint or not endpoint.strip():
            raise ValueError("the OTLP endpoint is empty: give a collector's URL (http/protobuf) or host:port (grpc)")
        sdk = import_sdk(protocol)
        from .. import __version__
        resource = sdk["Resource"].create({"service.name": service_name, "service.version": __version__,
                                           **(attributes or {})})
        provider = sdk["TracerProvider"](resource=resource)
        provider.add_span_processor(sdk["BatchSpanProcessor"](make_exporter(sdk["Exporter"], endpoint, protocol)))
        return cls(provider, endpoint, protocol)

    def epoch_ns(self, perf_counter_s: float) -> int:
        """A ``time.perf_counter()`` reading as the nanoseconds since the epoch that spans are stamped with."""
        return int(perf_counter_s * 1e9) + self._offset_ns

    @contextlib.contextmanager
    def request(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]],
                route: str | None = None) -> Iterator[Span]:
        """The SERVER span of one HTTP request, open for the ``with`` block. Its parent is the client's W3C
        ``traceparent`` (with ``tracestate``) among the ASGI ``headers``, when there is one. ``route`` is the
        matched route (low cardinality: ``/v1/embeddings``; None for a path that matches none): the span is named
        ``"POST /v1/embeddings"``, or by the method alone without a route. The caller sets
        ``span.set_attribute(HTTP_STATUS, code)`` before the block ends; a 5xx status, or an exception leaving
        the block (recorded, then raised again), marks the span as an error."""
        attributes = {HTTP_METHOD: method, URL_PATH: path}
        if route is not None:
            attributes[HTTP_ROUTE] = route
        span = self._tracer.start_span(f"{method} {route}" if route is not None else method,
                                       context=self._propagator.extract(trace_headers(headers)), kind=self._server,
                                       attributes=attributes, start_time=self.epoch_ns(time.perf_counter()),
                                       record_exception=False, set_status_on_exception=False)
        try:
            yield span
        except BaseException as e:
            span.record_exception(e)
            span.set_status(self._error)
            raise
        else:
            code = (getattr(span, "attributes", None) or {}).get(HTTP_STATUS)  # a sampled-out span has none
            if isinstance(code, int) and code >= 500:
                span.set_status(self._error)
        finally:
            span.end(end_time=self.epoch_ns(time.perf_counter()))

    def child(self, parent: Span, name: str, start_ns: int, end_ns: int,
              attributes: Mapping[str, Any] | None = None) -> Span:
        """A finished INTERNAL span under ``parent`` from ``start_ns`` to ``end_ns`` (epoch ns: :meth:`epoch_ns`
        of ``time.perf_counter()`` readings); None values among ``attributes`` are left out."""
        span = self._tracer.start_span(name, context=self._in_context(parent, self._empty()), start_time=start_ns,
                                       attributes={k: v for k, v in (attributes or {}).items() if v is not None})
        span.end(end_time=end_ns)
        return span

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send the buffered spans now; whether it finished within ``timeout_s``."""
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter (the server's stop). Spans ended later are dropped."""
        self.provider.shutdown()


def import_sdk(protocol: str) -> dict[str, Any]:
    """The OpenTelemetry SDK classes and the span exporter of ``protocol``; ``ImportError`` naming the extra."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ImportError(f"tracing needs OpenTelemetry's SDK and OTLP exporters, which are not installed "
                          f"({e}): {INSTALL_HINT}") from e
    return {"Resource": Resource, "TracerProvider": TracerProvider, "BatchSpanProcessor": BatchSpanProcessor,
            "Exporter": OTLPSpanExporter}


def make_exporter(exporter_cls, endpoint: str, protocol: str):
    """The OTLP span exporter of ``protocol`` for ``endpoint`` as :meth:`Tracing.start` reads it."""
    endpoint = endpoint.strip()
    if protocol == "grpc":
        # a bare host:port is plaintext (the gRPC exporter would otherwise take "localhost" for a URL scheme)
        scheme = endpoint.split("://", 1)[0].lower() if "://" in endpoint else None
        return exporter_cls(endpoint=endpoint, insecure=scheme != "https")
    return exporter_cls(endpoint=traces_url(endpoint))


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of ``endpoint``: a base URL gets ``/v1/traces`` appended (after its own path, as
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` does); a URL that already ends in it is kept."""
    if "://" not in endpoint:
        raise ValueError(f"the OTLP/HTTP endpoint {endpoint!r} is not a URL: give http://host:4318 or "
                         "https://host:4318 (or use --otlp-protocol grpc for host:port)")
    base = endpoint.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def trace_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """The W3C trace-context headers among ASGI ``headers`` (lower-case byte names), as the propagator's carrier."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in _TRACE_HEADERS}


def request_id(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The id of one request: the client's ``x-request-id`` when it sent a usable one (1 to 128 printable ASCII
    characters, no spaces), else 16 random hex digits. The server logs it and answers it in ``x-request-id``."""
    for k, v in headers:
        if k == _REQUEST_ID_HEADER:
            if 0 < len(v) <= _REQUEST_ID_MAX and all(0x21 <= c <= 0x7e for c in v):
                return v.decode("ascii")
            break
    return secrets.token_hex(8)


def request_fields(request_id: str, method: str, route: str, model: str | None, texts: int | None,
                   tokens: int | None, status: int, ms: float) -> dict[str, dict[str, Any]]:
    """The ``extra=`` of the server's per-request log line: :class:`JsonFormatter` writes these fields at the top
    level of the line's object (the text format ignores them)."""
    return {"fields": {"request_id": request_id, "method": method, "route": route, "model": model, "texts": texts,
                       "tokens": tokens, "status": status, "ms": round(ms, 3)}}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger``, ``message``, the
    items of a record's ``fields`` mapping (``extra={"fields": {...}}``, see :func:`request_fields`), and
    ``exception`` (the traceback text) when the record has one. A field named like a base key does not replace it."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for k, v in fields.items():
                out.setdefault(str(k), v)
        if record.exc_info:
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str, json: bool, stream: IO[str] | None = None) -> logging.Handler:
    """The root logger at ``level`` (debug, info, warning, error, critical; any case) writing to ``stream``
    (stderr) as JSON lines (``json``) or text. Calling it again replaces the handler it installed before and keeps
    any other. Uvicorn's own loggers reach it when uvicorn runs with ``log_config=None``."""
    levels = logging.getLevelNamesMapping()
    name = level.upper() if isinstance(level, str) else level
    if name not in levels or name == "NOTSET":
        raise ValueError(f"unknown log level {level!r}; choose one of debug, info, warning, error, critical")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "padfree", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(TEXT_FORMAT))
    handler.padfree = True  # type: ignore[attr-defined]  # marks the handler this function replaces next time
    root.addHandler(handler)
    root.setLevel(levels[name])
    return handler
