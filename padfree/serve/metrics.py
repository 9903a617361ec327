"""Prometheus metrics of one server (its own registry, so that several apps can live in one process)."""
from __future__ import annotations

from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

from .scheduler import BatchStats

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOKENS = tuple(2 ** k for k in range(4, 17))      # 16 .. 65536 real tokens per batch
_SEQUENCES = tuple(2 ** k for k in range(0, 12))   # 1 .. 2048 sequences per batch


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)   # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)
        self.requests = Counter("padfree_requests", "HTTP requests by route and outcome "
                                "(ok, client_error, overloaded, server_error, cancelled)", ["route", "outcome"],
                                registry=r)
        self.failures = Counter("padfree_failures", "failed requests by kind (validation, payload, auth, "
                                "overloaded, not_found, backend, client_gone)", ["kind"], registry=r)
        self.in_flight = Gauge("padfree_requests_in_flight", "inference requests being served", registry=r)
        self.queue_size = Gauge("padfree_queue_size", "sequences waiting for a batch", ["model"], registry=r)
        self.skipped = Counter("padfree_sequences_skipped", "sequences never computed because their client left",
                               ["model"], registry=r)
        self.batch_tokens = Histogram("padfree_batch_tokens", "real tokens per batch", ["model"], buckets=_TOKENS,
                                      registry=r)
        self.batch_sequences = Histogram("padfree_batch_sequences", "sequences per batch", ["model"],
                                         buckets=_SEQUENCES, registry=r)
        self.batch_failures = Counter("padfree_batch_failures", "forwards that raised", ["model"], registry=r)
        self.queue_seconds = Histogram("padfree_queue_seconds", "time from queueing to a request's first batch",
                                       ["model"], buckets=_SECONDS, registry=r)
        self.tokenization_seconds = Histogram("padfree_tokenization_seconds", "time tokenizing a request",
                                              ["model"], buckets=_SECONDS, registry=r)
        self.inference_seconds = Histogram("padfree_inference_seconds", "time in the forwards that carried a "
                                           "request", ["model"], buckets=_SECONDS, registry=r)
        self.batch_seconds = Histogram("padfree_batch_seconds", "time of one forward", ["model"], buckets=_SECONDS,
                                       registry=r)

    def watch_queue(self, model: str, queued: Callable[[], int]) -> None:
        self.queue_size.labels(model).set_function(queued)

    def batch(self, stats: BatchStats) -> None:
        m = stats.queue
        self.batch_tokens.labels(m).observe(stats.tokens)
        self.batch_sequences.labels(m).observe(stats.sequences)
        self.batch_seconds.labels(m).observe(stats.seconds)
        if stats.error is not None:
            self.batch_failures.labels(m).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
