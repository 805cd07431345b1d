"""Prometheus metrics of one Controller (own registry, so tests can run several) and the /metrics, /healthz,
/readyz HTTP endpoints."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)
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
        self.is_leader = Gauge(PREFIX + "is_leader", "1 if this replica is the leader.", registry=self.registry)
        self._expiries: dict[str, float] = {}
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

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """Serves /metrics, /healthz (threads alive) and /readyz (caches synced) on a port (0: any free port)."""

    def __init__(self, metrics: Metrics, port: int, healthy: Callable[[], bool], ready: Callable[[], bool]) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, outer.metrics.exposition(), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/livez"):
                    ok = outer.healthy()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n")
                elif path == "/readyz":
                    ok = outer.ready()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"not ready: caches not synced\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # quiet: probes hit this every few seconds
                log.debug(format, *args)

        self.metrics = metrics
        self.healthy = healthy
        self.ready = ready
        self._server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-server", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
