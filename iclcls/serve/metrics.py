"""Prometheus metrics: requests by endpoint and status, latencies, batches, classes, pool size.

Each app has its own registry (no process-global state), rendered in the text format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_ENDPOINTS = {"/v1/classify", "/v1/classes", "/healthz", "/metrics", "/"}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, live: Any) -> None:
        disable_created_metrics()  # no *_created series: they double the output and nobody reads them
        self.registry = r = CollectorRegistry()
        self.requests = Counter("iclcls_requests", "HTTP requests", ["method", "endpoint", "status"], registry=r)
        self.latency = Histogram(
            "iclcls_request_duration_seconds", "HTTP request latency", ["method", "endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_requests = Histogram(
            "iclcls_batch_requests", "classify requests per classifier call (micro-batching)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r,
        )
        self.batch_texts = Histogram(
            "iclcls_batch_texts", "texts per classifier call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.predict_seconds = Histogram(
            "iclcls_predict_duration_seconds", "time in one classifier call", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.additions = Counter("iclcls_additions", "acknowledged additions", registry=r)
        self.added_examples = Counter("iclcls_added_examples", "examples in acknowledged additions", registry=r)
        Gauge("iclcls_classes", "classes in the live state", registry=r).set_function(lambda: len(live.view.counts))
        Gauge("iclcls_pool_size", "examples in the demonstration pool", registry=r).set_function(
            lambda: live.view.pool_size
        )
        Gauge("iclcls_applied_seq", "last addition applied (write-ahead log seq)", registry=r).set_function(
            lambda: live.applied_seq
        )
        Gauge("iclcls_snapshot_seq", "last addition held by a snapshot", registry=r).set_function(
            lambda: live.snapshot_seq
        )
        self._queue = Gauge("iclcls_queue_depth", "classify requests waiting for the classifier", registry=r)

    def bind_queue(self, depth: Callable[[], int]) -> None:
        self._queue.set_function(depth)

    def observe_batch(self, requests: int, texts: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_texts.observe(texts)
        self.predict_seconds.observe(seconds)

    def observe_addition(self, examples: int) -> None:
        self.additions.inc()
        self.added_examples.inc(examples)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def wrap(self, app: Any) -> Any:
        """An ASGI wrapper that counts every request (auth and size refusals included)."""

        async def asgi(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
            method = scope.get("method", "GET")
            status = [500]

            async def send_(msg: dict) -> None:
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                await send(msg)

            t0 = time.perf_counter()
            try:
                await app(scope, receive, send_)
            finally:
                self.latency.labels(method, endpoint).observe(time.perf_counter() - t0)
                self.requests.labels(method, endpoint, str(status[0])).inc()

        return asgi
