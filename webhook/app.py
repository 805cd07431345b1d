"""The webhook's HTTP application: POST /mutate-pods, /healthz, /readyz and /metrics.

The request path stays lean: a bare ASGI endpoint, body bytes in, `review.review` against the cache's dict-only
view, bytes out (FastAPI's request and validation layers cost as much as the review itself).
Only when the cache misses does the review run again in the thread pool, where it may ask the API server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from webhook import review
from webhook.mutation import ImportLookup, LookupWouldBlock

JSON_TYPE = "application/json"
MUTATE_PATH = "/mutate-pods"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WebhookCache(ImportLookup, Protocol):
    """What the app needs from its cache (webhook.cache.WatchCache, or StaticCache in tests)."""

    @property
    def has_synced(self) -> bool: ...

    def cached(self) -> ImportLookup: ...

    def misses(self) -> Mapping[str, int]: ...


class _MissCollector:
    """Exposes the cache's miss counters, which the cache keeps itself (it exists before any app)."""

    def __init__(self, cache: WebhookCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "kubemcsa_webhook_cache_misses",
            "Lookups that missed the watch-fed cache and asked the API server, by kind.",
            labels=["kind"],
        )
        for kind, count in sorted(self._cache.misses().items()):
            family.add_metric([kind], count)
        yield family


class _Metrics:
    def __init__(self, cache: WebhookCache) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kubemcsa_webhook_requests",
            "Admission requests answered, by result (allowed, patched, refused, bad_request, error).",
            ["result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubemcsa_webhook_request_duration_seconds",
            "Time to answer an admission request, from body received to answer ready.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "kubemcsa_webhook_refusals", "Pods refused, by reason.", ["reason"], registry=self.registry
        )
        self.registry.register(_MissCollector(cache))
        # Children resolved once: label lookups are not free on the hot path.
        self._results = {
            result: self.requests.labels(result)
            for result in (
                review.RESULT_ALLOWED,
                review.RESULT_PATCHED,
                review.RESULT_REFUSED,
                review.RESULT_BAD_REQUEST,
                review.RESULT_ERROR,
            )
        }

    def record(self, answer: review.Answer, seconds: float) -> None:
        self._results[answer.result].inc()
        self.latency.observe(seconds)
        if answer.result in (review.RESULT_REFUSED, review.RESULT_ERROR):
            self.refusals.labels(answer.reason).inc()


class _Disconnected(Exception):
    """The client went away before sending the whole body: there is no one to answer."""


async def _read_body(receive: Receive) -> bytes | None:
    """The body, or None if it is larger than review.MAX_BODY_BYTES (read no further than that)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > review.MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


_JSON_HEADERS = [(b"content-type", JSON_TYPE.encode())]
_TOO_LARGE = review.bad_request(
    f"The request body is larger than {review.MAX_BODY_BYTES} bytes; send a single AdmissionReview."
)


class _MutatePods:
    """POST /mutate-pods as a plain ASGI endpoint: no request object, no validation layer, bytes in and out."""

    def __init__(self, cache: WebhookCache, metrics: _Metrics) -> None:
        self.cache = cache
        self.cached = cache.cached()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > review.MAX_BODY_BYTES:
                    await self._send(send, _TOO_LARGE)
                    return
                break
        try:
            body = await _read_body(receive)
        except _Disconnected:
            return
        started = time.perf_counter()
        if body is None:
            answer = _TOO_LARGE
        else:
            try:
                answer = review.review(body, self.cached)
            except LookupWouldBlock:
                # Something is not in the cache yet: decide in a worker thread, where the cache may ask the API.
                answer = await run_in_threadpool(review.review, body, self.cache)
        self.metrics.record(answer, time.perf_counter() - started)
        await self._send(send, answer)

    @staticmethod
    async def _send(send: Send, answer: review.Answer) -> None:
        headers = [*_JSON_HEADERS, (b"content-length", str(len(answer.body)).encode())]
        await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


class _WebhookApp(FastAPI):
    """FastAPI, except that POST /mutate-pods goes straight to its endpoint, without the middleware stack."""

    mutate_pods: _MutatePods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == MUTATE_PATH and scope["method"] == "POST":
            await self.mutate_pods(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(cache: WebhookCache, *, tls_ready: Callable[[], bool] | None = None) -> FastAPI:
    """The webhook application over this cache; `tls_ready` tells /readyz whether a certificate is loaded."""
    app = _WebhookApp(title="multicluster-service-account webhook", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics(cache)
    app.state.metrics = metrics
    app.state.draining = False
    # The hot path: a bare ASGI endpoint, reached before any middleware or routing (see _WebhookApp).
    app.mutate_pods = _MutatePods(cache, metrics)
    app.router.routes.append(Route(MUTATE_PATH, app.mutate_pods, methods=["POST"]))  # for the route listing

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b"ok", media_type="text/plain")

    @app.get("/readyz")
    async def readyz() -> Response:
        problems = []
        if app.state.draining:
            problems.append("shutting down")
        if not cache.has_synced:
            problems.append("the cache of ServiceAccountImports and namespaces has not synced yet")
        if tls_ready is not None and not tls_ready():
            problems.append("no serving certificate is loaded yet")
        if problems:
            return Response(("not ready: " + "; ".join(problems)).encode(), status_code=503, media_type="text/plain")
        return Response(b"ok", media_type="text/plain")

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
