"""padfree.serve.telemetry: spans sent by :class:`Tracing` reach real OTLP collectors on loopback (HTTP and gRPC,
tests/otlp_receiver.py) with their names, parents, times and attributes; JSON log lines; request ids."""
from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest
from otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver

from padfree import __version__
from padfree.serve import telemetry
from padfree.serve.telemetry import HTTP_STATUS, JsonFormatter, Tracing, configure_logging, request_id, \
    request_fields

CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(params=[OtlpHttpReceiver, OtlpGrpcReceiver], ids=["http", "grpc"])
def receiver(request):
    with request.param() as r:
        yield r


@pytest.fixture
def tracing(receiver):
    t = Tracing.start(receiver.endpoint, receiver.protocol, attributes={"deployment.environment": "test"})
    yield t
    t.shutdown()


def serve_one(tracing: Tracing, headers=(), status: int = 200, route: str | None = "/v1/embeddings"):
    """What the server does for one request: the request span, four children with measured times. Returns the
    children's (name, start_ns, end_ns) and the request span's context."""
    t0 = time.perf_counter()
    marks = [t0 + k * 1e-3 for k in range(5)]   # tokenize, queue, inference, postprocess: 1 ms each, in the past
    with tracing.request("POST", "/v1/embeddings", list(headers), route=route) as span:
        span.set_attribute("padfree.model", "minilm")
        times = []
        for name, a, b in zip(("tokenize", "queue", "inference", "postprocess"), marks, marks[1:]):
            times.append((name, tracing.epoch_ns(a), tracing.epoch_ns(b)))
            tracing.child(span, name, times[-1][1], times[-1][2],
                          {"padfree.tokens": 42 if name == "inference" else None})
        span.set_attribute(HTTP_STATUS, status)
    return times, span.get_span_context()


def test_spans_arrive_with_names_parents_times_and_attributes(receiver, tracing):
    before = time.time_ns()
    times, ctx = serve_one(tracing)
    tracing.shutdown()
    spans = receiver.wait_for(5)
    assert len(spans) == 5
    top = receiver.named("POST /v1/embeddings")
    assert top.kind == "SERVER" and top.parent_span_id == "" and top.status == "UNSET"
    assert top.trace_id == format(ctx.trace_id, "032x") and top.span_id == format(ctx.span_id, "016x")
    assert top.attributes == {"http.request.method": "POST", "url.path": "/v1/embeddings",
                              "http.route": "/v1/embeddings", "padfree.model": "minilm", HTTP_STATUS: 200}
    assert top.resource["service.name"] == "padfree" and top.resource["service.version"] == __version__
    assert top.resource["deployment.environment"] == "test"
    assert top.scope == "padfree.serve"
    # the request span is stamped on the same clock as the children: wall time around the call
    assert before - 5_000_000 <= top.start_ns <= top.end_ns <= time.time_ns() + 5_000_000
    for name, start, end in times:
        s = receiver.named(name)
        assert s.kind == "INTERNAL" and s.trace_id == top.trace_id and s.parent_span_id == top.span_id
        assert (s.start_ns, s.end_ns) == (start, end)
        assert s.end_ns - s.start_ns == pytest.approx(1_000_000, abs=1_000)
        assert s.attributes == ({"padfree.tokens": 42} if name == "inference" else {})
    assert top.start_ns - 5_000_000 <= times[0][1]


def test_traceparent_makes_the_request_a_child_of_the_clients_trace(receiver, tracing):
    headers = [(b"content-type", b"application/json"), (b"traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()),
               (b"tracestate", b"vendor=abc")]
    serve_one(tracing, headers)
    serve_one(tracing)                     # no header: a trace of its own
    tracing.flush()
    spans = receiver.wait_for(10)
    tops = [s for s in spans if s.kind == "SERVER"]
    assert len(tops) == 2
    child_of_client = [s for s in tops if s.trace_id == CLIENT_TRACE]
    assert len(child_of_client) == 1
    top = child_of_client[0]
    assert top.parent_span_id == CLIENT_SPAN and top.trace_state == "vendor=abc"
    assert {s.trace_id for s in spans if s.parent_span_id == top.span_id} == {CLIENT_TRACE}
    assert len([s for s in spans if s.trace_id == CLIENT_TRACE]) == 5
    other = next(s for s in tops if s is not top)
    assert other.parent_span_id == "" and other.trace_id != CLIENT_TRACE


def test_server_errors_mark_the_span_but_client_errors_do_not(receiver, tracing):
    for status in (500, 503, 404, 429, 200):
        serve_one(tracing, status=status)
    tracing.flush()
    receiver.wait_for(25)
    statuses = {s.attributes[HTTP_STATUS]: s.status for s in receiver.spans if s.kind == "SERVER"}
    assert statuses == {500: "ERROR", 503: "ERROR", 404: "UNSET", 429: "UNSET", 200: "UNSET"}


def test_an_exception_in_the_request_is_recorded_and_raised(receiver, tracing):
    with pytest.raises(RuntimeError, match="boom"):
        with tracing.request("POST", "/embed", [], route="/embed"):
            raise RuntimeError("boom")
    tracing.flush()
    (span,) = receiver.wait_for(1)
    assert span.name == "POST /embed" and span.status == "ERROR" and span.events == ["exception"]


def test_a_path_without_route_names_the_span_by_method(receiver, tracing):
    with tracing.request("GET", "/nope/123", []) as span:
        span.set_attribute(HTTP_STATUS, 404)
    tracing.flush()
    (span,) = receiver.wait_for(1)
    assert span.name == "GET" and "http.route" not in span.attributes
    assert span.attributes["url.path"] == "/nope/123"


def test_shutdown_flushes_what_is_buffered(receiver):
    tracing = Tracing.start(receiver.endpoint, receiver.protocol)   # the batch processor waits 5 s by default
    serve_one(tracing)
    time.sleep(0.2)
    assert receiver.spans == []                 # still buffered
    tracing.shutdown()
    assert len(receiver.spans) == 5             # sent before shutdown returned
    serve_one(tracing)                          # after shutdown: dropped, no error
    time.sleep(0.1)
    assert len(receiver.spans) == 5


def test_two_tracings_in_one_process_keep_their_own_spans():
    with OtlpHttpReceiver() as a, OtlpGrpcReceiver() as b:
        ta, tb = Tracing.start(a.endpoint, a.protocol, service_name="one"), Tracing.start(b.endpoint, b.protocol)
        for t, route in ((ta, "/embed"), (tb, "/rerank")):
            with t.request("POST", route, [], route=route) as span:
                span.set_attribute(HTTP_STATUS, 200)
        ta.shutdown()
        assert [(s.name, s.resource["service.name"]) for s in a.spans] == [("POST /embed", "one")]
        with tb.request("POST", "/predict", [], route="/predict") as span:   # the other one still runs
            span.set_attribute(HTTP_STATUS, 200)
        tb.shutdown()
        assert [(s.name, s.resource["service.name"]) for s in b.spans] == [("POST /rerank", "padfree"),
                                                                           ("POST /predict", "padfree")]


def test_endpoints_as_otel_reads_them():
    assert telemetry.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert telemetry.traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert telemetry.traces_url("https://x.example/otlp") == "https://x.example/otlp/v1/traces"
    assert telemetry.traces_url("http://collector:4318/v1/traces") == "http://collector:4318/v1/traces"
    with pytest.raises(ValueError, match="not a URL"):
        telemetry.traces_url("collector:4318")
    with pytest.raises(ValueError, match="unknown OTLP protocol 'thrift'"):
        Tracing.start("http://127.0.0.1:1", "thrift")
    with pytest.raises(ValueError, match="endpoint is empty"):
        Tracing.start(" ", "grpc")


def test_grpc_endpoint_as_a_url():
    with OtlpGrpcReceiver() as r:
        tracing = Tracing.start(f"http://{r.endpoint}", "grpc")
        serve_one(tracing)
        tracing.shutdown()
        assert len(r.wait_for(5)) == 5


@pytest.mark.parametrize("protocol,module", [("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
                                             ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
                                             ("grpc", "opentelemetry.sdk.trace")])
def test_without_the_extra_the_error_names_it(monkeypatch, protocol, module):
    monkeypatch.setitem(sys.modules, module, None)   # what an interpreter without the package raises on import
    with pytest.raises(ImportError, match=r"pip install 'padfree\[otel\]'"):
        Tracing.start("http://127.0.0.1:1", protocol)


# ---------------------------------------------------------------------- logs
def log_lines(fmt: logging.Formatter, emit) -> list[str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    logger = logging.getLogger("padfree.test_telemetry")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue().splitlines()


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """The process's local time zone set to New York's (the log lines' times must still be UTC)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_json_lines_carry_the_request_fields_and_exceptions(local_time_not_utc):
    def emit(log):
        log.info("POST /v1/embeddings 200 minilm texts=%s\nsecond line", 3,
                 extra=request_fields("abc123", "POST", "/v1/embeddings", "minilm", 3, 17, 200, 12.34567))
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("inference failed on model %s", "minilm")
        log.warning("plain", extra={"fields": {"level": "spoofed", "x": object()}})
    before = time.time()
    lines = log_lines(JsonFormatter(), emit)
    assert len(lines) == 3
    req, exc, plain = (json.loads(x) for x in lines)
    assert req == {"time": req["time"], "level": "INFO", "logger": "padfree.test_telemetry",
                   "message": "POST /v1/embeddings 200 minilm texts=3\nsecond line", "request_id": "abc123",
                   "method": "POST", "route": "/v1/embeddings", "model": "minilm", "texts": 3, "tokens": 17,
                   "status": 200, "ms": 12.346}
    assert req["time"].endswith("Z") and len(req["time"]) == len("2026-01-01T00:00:00.000Z")
    from datetime import datetime
    stamp = datetime.fromisoformat(req["time"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= stamp <= time.time() + 1
    assert time.localtime().tm_gmtoff != 0     # the fixture did change the local time
    assert exc["level"] == "ERROR" and exc["message"] == "inference failed on model minilm"
    assert exc["exception"].startswith("Traceback") and "ZeroDivisionError" in exc["exception"]
    assert "exception" not in req
    assert plain["level"] == "WARNING" and plain["x"].startswith("<object")


def test_configure_logging_installs_one_handler_and_replaces_it():
    root = logging.getLogger()
    level = root.level
    first, second = io.StringIO(), io.StringIO()
    try:
        configure_logging("debug", json=True, stream=first)
        logging.getLogger("padfree.serve").debug("hello %s", "json")
        configure_logging("INFO", json=False, stream=second)
        logging.getLogger("padfree.serve").debug("not shown")
        logging.getLogger("padfree.serve").info("hello %s", "text")
        assert sum(getattr(h, "padfree", False) for h in root.handlers) == 1
        assert root.level == logging.INFO
    finally:
        for h in [h for h in root.handlers if getattr(h, "padfree", False)]:
            root.removeHandler(h)
        root.setLevel(level)
    line = json.loads(first.getvalue())
    assert (line["level"], line["logger"], line["message"]) == ("DEBUG", "padfree.serve", "hello json")
    assert "hello json" not in second.getvalue()
    assert second.getvalue().rstrip().endswith("INFO padfree.serve: hello text")
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud", json=True)


def test_request_id_honours_a_clean_incoming_one():
    assert request_id([(b"x-request-id", b"client-42.a_b")]) == "client-42.a_b"
    fresh = {request_id([]) for _ in range(100)}
    assert len(fresh) == 100 and all(len(x) == 16 and int(x, 16) >= 0 for x in fresh)
    for bad in (b"", b"a b", b"new\nline", b"x" * 129, "é".encode()):
        rid = request_id([(b"x-request-id", bad)])
        assert len(rid) == 16 and rid.encode() != bad
