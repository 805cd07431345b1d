"""Prometheus metrics of one Controller (own registry, so tests can run several); served by runtime.health."""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "kubemcsa_controller_"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            PREFIX + "reconciles_total",
            "Reconciles of ServiceAccountImports, by result.",
            ["result"],
            registry=self.registry,
        )
        self.errors = Counter(
            PREFIX + "errors_total", "Failed reconciles, by condition reason.", ["reason"], registry=self.registry
        )
        self.latency = Histogram(
            PREFIX + "reconcile_duration_seconds",
            "Time to reconcile one import, API calls included.",
            registry=self.registry,
        )
        self.tokens_refreshed = Counter(
            PREFIX + "tokens_refreshed_total", "Tokens obtained from source clusters.", registry=self.registry
        )
        self.next_expiry = Gauge(
            PREFIX + "seconds_to_next_expiry",
            "Seconds until the earliest token expiry among imports.",
            registry=self.registry,
        )
        self.source_demand = Gauge(
            PREFIX + "source_token_demand_ratio",
            "Token requests per second the imports of a source need to stay refreshed, over its --source-qps "
            "(above 1 refreshes fall behind; a SourceNearCapacity Event at 0.8).",
            ["cluster"],
            registry=self.registry,
        )
        self.source_reachable = Gauge(
            PREFIX + "source_reachable",
            "1 while the controller reaches a source cluster (its calls and its watch of the source's exports get "
            "answers), 0 while it does not.",
            ["cluster"],
            registry=self.registry,
        )
        self.is_leader = Gauge(PREFIX + "is_leader", "1 if this replica is the leader.", registry=self.registry)
        self._expiries: dict[str, float] = {}
        self._reachability_shown: set[str] = set()  # the sources source_reachable has a series of
        self._lock = threading.Lock()
        self.next_expiry.set_function(self._seconds_to_next_expiry)

    def set_expiry(self, key: str, expires_at: float | None) -> None:
        with self._lock:
            if expires_at is None:
                self._expiries.pop(key, None)
            else:
                self._expiries[key] = expires_at

    def _seconds_to_next_expiry(self) -> float:
        with self._lock:
            if not self._expiries:
                return float("inf")
            return min(self._expiries.values()) - time.time()

    def set_reachability(self, unreachable: set[str], known: set[str]) -> None:
        """source_reachable for each `known` source; the series of sources no longer known go."""
        with self._lock:
            gone, self._reachability_shown = self._reachability_shown - known, set(known)
        for cluster in gone:
            self.source_reachable.remove(cluster)
        for cluster in known:
            self.source_reachable.labels(cluster).set(0 if cluster in unreachable else 1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
