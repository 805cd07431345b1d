"""The webhook's Prometheus metrics: what /metrics serves (webhook.app records them on the request path).

Counters of requests by result and of refusals by reason, the latency histogram, and the cache's misses (which
the cache counts itself: it exists before any app; a serving worker of several counts its own, webhook.worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

from webhook import review

if TYPE_CHECKING:
    from webhook.app import WebhookCache

CACHE_MISSES = "kubemcsa_webhook_cache_misses"
CACHE_MISSES_HELP = "Lookups that missed the watch-fed cache and asked the API server, by kind."
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _MissCollector:
    """Exposes the cache's miss counters, which the cache keeps itself (it exists before any app)."""

    def __init__(self, cache: WebhookCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(CACHE_MISSES, CACHE_MISSES_HELP, labels=["kind"])
        for kind, count in sorted(self._cache.misses().items()):
            family.add_metric([kind], count)
        yield family


class Metrics:
    """The webhook's own metrics (requests by result, latency, refusals by reason) and its cache's misses."""

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
            buckets=LATENCY_BUCKETS,
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
