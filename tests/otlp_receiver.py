"""Small OTLP trace collectors on loopback for the tests: real servers that decode what an exporter sends.

    with OtlpHttpReceiver() as r:          # or OtlpGrpcReceiver()
        tracing = Tracing.start(r.endpoint, r.protocol)
        ...
        spans = r.wait_for(4, timeout=5)   # list[ReceivedSpan], in arrival order

``OtlpHttpReceiver``: http.server on 127.0.0.1 (a free port), ``POST /v1/traces`` with an
``ExportTraceServiceRequest`` protobuf body (gzip or not), answered 200 with an empty
``ExportTraceServiceResponse``; ``endpoint`` is the base URL (``http://127.0.0.1:PORT``). ``OtlpGrpcReceiver``: the
gRPC ``TraceService`` on 127.0.0.1 (a free port), ``endpoint`` = ``127.0.0.1:PORT``. Both keep every span
decoded as a :class:`ReceivedSpan`.
"""
from __future__ import annotations

import gzip
import http.server
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass
class ReceivedSpan:
    """One span as a collector received it (ids as lower-case hex; ``parent_span_id`` "" for a root)."""
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str                   # "SERVER", "INTERNAL", ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str                 # "UNSET", "OK" or "ERROR"
    trace_state: str = ""
    events: list[str] = field(default_factory=list)      # event names ("exception", ...)
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""             # the instrumentation scope (the tracer's name)


def any_value(v) -> Any:
    """An OTLP ``AnyValue`` as Python."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of one export request."""
    from opentelemetry.proto.trace.v1 import trace_pb2
    kinds = {v: k.removeprefix("SPAN_KIND_") for k, v in trace_pb2.Span.SpanKind.items()}
    codes = {v: k.removeprefix("STATUS_CODE_") for k, v in trace_pb2.Status.StatusCode.items()}
    out = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), kind=kinds[s.kind], start_ns=s.start_time_unix_nano,
                    end_ns=s.end_time_unix_nano, attributes=attributes(s.attributes), status=codes[s.status.code],
                    trace_state=s.trace_state, events=[e.name for e in s.events], resource=resource,
                    scope=ss.scope.name))
    return out


class _Collector:
    """What both receivers share: the spans received, guarded by a condition, and the context-manager protocol."""
    protocol = ""

    def __init__(self):
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.exports = 0                # export requests received

    def _receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = decode(request)
        with self._changed:
            self._spans.extend(spans)
            self.exports += 1
            self._changed.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._changed:
            return list(self._spans)

    def wait_for(self, n: int, timeout: float = 5.0) -> list[ReceivedSpan]:
        """The spans once at least ``n`` arrived; ``TimeoutError`` listing what did after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._spans) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._spans)} spans arrived at {self.endpoint} within {timeout} s, "
                                       f"not {n}: {[s.name for s in self._spans]}")
                self._changed.wait(left)
            return list(self._spans)

    def named(self, name: str) -> ReceivedSpan:
        """The one span called ``name``; ``AssertionError`` if there are none or several."""
        found = [s for s in self.spans if s.name == name]
        assert len(found) == 1, f"{len(found)} spans named {name!r} among {[s.name for s in self.spans]}"
        return found[0]

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OtlpHttpReceiver(_Collector):
    """OTLP/HTTP (protobuf) on 127.0.0.1: ``endpoint`` is the base URL, ``/v1/traces`` the one path served."""
    protocol = "http/protobuf"
    PATH = "/v1/traces"

    def __init__(self):
        super().__init__()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as the exporter's session expects

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != receiver.PATH:
                    return self._answer(404, b"not found", "text/plain")
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                try:
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                except Exception as e:  # noqa: BLE001  (any decoding failure is the client's)
                    return self._answer(400, f"not an ExportTraceServiceRequest: {e}".encode(), "text/plain")
                receiver._receive(request)
                self._answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                             "application/x-protobuf")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="otlp-http-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class OtlpGrpcReceiver(_Collector):
    """OTLP/gRPC on 127.0.0.1 (plaintext): ``endpoint`` is ``127.0.0.1:PORT``."""
    protocol = "grpc"

    def __init__(self):
        super().__init__()
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802  (the generated name)
                receiver._receive(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(ThreadPoolExecutor(2, thread_name_prefix="otlp-grpc-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self._server.start()

    def close(self) -> None:
        self._server.stop(grace=None).wait()
