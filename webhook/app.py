"""The webhook's HTTP application: POST /mutate-pods, /healthz, /readyz and /metrics.

The request path stays lean: body bytes in, `review.review` against the cache's dict-only view, bytes out.
Only when the cache misses does the review run again in the thread pool, where it may ask the API server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

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


async def _read_body(request: Request) -> bytes | None:
    """The body, or None if it is larger than review.MAX_BODY_BYTES (read no further than that)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > review.MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > review.MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(cache: WebhookCache, *, tls_ready: Callable[[], bool] | None = None) -> FastAPI:
    """The webhook application over this cache; `tls_ready` tells /readyz whether a certificate is loaded."""
    app = FastAPI(title="multicluster-service-account webhook", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = _Metrics(cache)
    app.state.metrics = metrics
    app.state.draining = False
    cached = cache.cached()

    @app.post(MUTATE_PATH)
    async def mutate_pods(request: Request) -> Response:
        body = await _read_body(request)
        started = time.perf_counter()
        if body is None:
            answer = review.bad_request(
                f"The request body is larger than {review.MAX_BODY_BYTES} bytes; send a single AdmissionReview."
            )
        else:
            try:
                answer = review.review(body, cached)
            except LookupWouldBlock:
                answer = await run_in_threadpool(review.review, body, cache)
        metrics.record(answer, time.perf_counter() - started)
        return Response(answer.body, status_code=answer.status_code, media_type=JSON_TYPE)

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
