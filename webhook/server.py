"""The webhook served over TLS by uvicorn in a background thread (`WebhookServer`), the process side of the webhook.

webhook.app is the ASGI application (what a request gets); this module is what serves it: uvicorn with the
serving certificate reloaded into the live TLS context when its files change (kubemcsa.certificates.reloader), the
webhook port's
connection guards (webhook.connections) and one TLS record per answer (webhook.coalesce), the plain-HTTP health
port, and a graceful stop. `python -m webhook` runs one (or webhook.workers runs one per serving process); tests,
the demo and the benchmarks start it directly.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import uvicorn

from kubemcsa.certificates.reloader import CertificateReloader
from webhook import coalesce, connections, workers
from webhook.app import WebhookCache, create_app, create_health_app

if TYPE_CHECKING:
    from kubernetes import client
    from prometheus_client import CollectorRegistry

# The Kubernetes client (webhook.cache) is imported only where the server makes its own cache: the serving workers
# (webhook.worker) run this server on a copy fed by their parent, and never talk to the API server themselves.

log = logging.getLogger("webhook")

HEALTH_MAX_CONNECTIONS = 256
HEALTH_MAX_CONNECTIONS_PER_CLIENT = 16


class _Server(uvicorn.Server):
    """uvicorn's server, remembering its event loop (the reloader swaps certificates on it)."""

    loop: asyncio.AbstractEventLoop | None = None
    handshake_timeout: float = connections.DEFAULT_REQUEST_READ_TIMEOUT

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        loop = self.loop = asyncio.get_running_loop()
        # uvicorn does not pass ssl_handshake_timeout (asyncio's default is 60 s): a client that never finishes its
        # handshake is dropped as soon as one that never finishes its request.
        loop.create_server = functools.partial(  # type: ignore[method-assign]
            loop.create_server, ssl_handshake_timeout=self.handshake_timeout
        )
        await super().serve(sockets)


class WebhookServer:
    """The webhook served over TLS in a background thread: `WebhookServer(api_client, cert, key).start()`.

    Used by main(), tests, the demo and the benchmark. `cache` defaults to a WatchCache on `api_client` (started
    and stopped with the server); port 0 picks a free port (see `.url`). The certificate files are checked every
    `reload_interval` seconds and reloaded when they change.
    """

    def __init__(
        self,
        api_client: client.ApiClient | None,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cache: WebhookCache | None = None,
        reload_interval: float = 2.0,
        graceful_timeout: float = 10.0,
        limits: connections.ConnectionLimits = connections.DEFAULT_LIMITS,
        health_port: int | None = None,
        health_host: str | None = None,
        listen_socket: socket.socket | None = None,
        exposition: CollectorRegistry | None = None,
        health_socket: socket.socket | None = None,
    ) -> None:
        if cache is None and api_client is None:
            raise ValueError("WebhookServer needs an api_client or a cache")
        self.cert_file = str(cert_file)
        self.key_file = str(key_file)
        self.host = host
        self.port = port
        self._own_cache = cache is None
        if cache is None:
            from webhook.cache import WatchCache

            cache = WatchCache(api_client)  # type: ignore[arg-type]
        self.cache: Any = cache
        # Sockets bound (and shared) by a parent process (webhook.workers): served instead of binding host:port.
        self._listen_socket = listen_socket
        self._health_socket = health_socket
        self.reload_interval = reload_interval
        self.graceful_timeout = graceful_timeout
        self.limits = limits
        # /healthz, /readyz and /metrics on a port of their own, in plain HTTP, outside the webhook port's caps.
        self.health_port = health_port
        self.health_host = health_host if health_host is not None else host
        self._health_server: uvicorn.Server | None = None
        self._health_thread: threading.Thread | None = None
        self.reloader: CertificateReloader | None = None
        self._tls_loaded = False
        self.app = create_app(self.cache, tls_ready=lambda: self._tls_loaded, exposition=exposition)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._reload_thread: threading.Thread | None = None
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        """The server's base URL, e.g. https://127.0.0.1:PORT (the webhook is at url + "/mutate-pods")."""
        return f"https://{_host_in_url(self.host)}:{self.port}"

    @property
    def health_url(self) -> str:
        """The health port's base URL, e.g. http://127.0.0.1:PORT (/healthz, /readyz, /metrics), once started."""
        if self.health_port is None:
            raise RuntimeError("this WebhookServer serves no health port (health_port=None)")
        return f"http://{_host_in_url(self.health_host)}:{self.health_port}"

    def start(self, timeout: float = 30.0) -> WebhookServer:
        if self._own_cache:
            self.cache.start()
        uvicorn_config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            ssl_certfile=self.cert_file,
            ssl_keyfile=self.key_file,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=self.graceful_timeout,
            # The API server keeps connections open between pod creations; don't make it re-handshake often, but
            # close idle ones after a bounded time.
            timeout_keep_alive=self.limits.idle_timeout,
            # Nothing here reads the client's address from the scope (the connection caps take it from the socket),
            # so X-Forwarded-* headers are not honoured: no client may pose as another, and no request pays for
            # parsing them. Nor does any answer name the server.
            proxy_headers=False,
            server_header=False,
            # Slow or idle clients are dropped after request_read_timeout, at most max_connections are open, and
            # at most max_connections_per_client from one address. Each answer in one TLS record and one send
            # (webhook.coalesce).
            http=coalesce.coalescing(
                connections.guarded_protocol(
                    self.limits.request_read_timeout,
                    self.limits.max_connections,
                    self.limits.max_connections_per_client,
                )
            ),
        )
        uvicorn_config.load()  # Raises here, in the caller's thread, if the certificate files are unusable.
        sock = self._listen_socket
        if sock is None:
            sock = workers.listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = _Server(uvicorn_config)
        self._server.handshake_timeout = self.limits.request_read_timeout
        self._thread = _serve_in_thread(self._server, sock, "webhook-http")
        if not _wait_started(self._server, self._thread, timeout):
            self.stop()
            raise RuntimeError(f"the webhook server did not start on {self.url}; see the log above for why")
        if self.health_port is not None:
            self._start_health(timeout)
        self.reloader = CertificateReloader(uvicorn_config.ssl, self.cert_file, self.key_file, loop=self._server.loop)
        self.reloader.mark_loaded()
        self._tls_loaded = True
        self._reload_thread = threading.Thread(target=self._reload_loop, name="webhook-cert-reload", daemon=True)
        self._reload_thread.start()
        log.info("serving the webhook on %s", self.url)
        return self

    def _start_health(self, timeout: float) -> None:
        assert self.health_port is not None
        health_config = uvicorn.Config(
            create_health_app(self.app),
            host=self.health_host,
            port=self.health_port,
            lifespan="off",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=self.limits.idle_timeout,
            # Kubelet's probes come from the node, Prometheus from its pod: a few connections per address suffice,
            # and one client holding many cannot fail another's probes.
            http=connections.guarded_protocol(
                self.limits.request_read_timeout, HEALTH_MAX_CONNECTIONS, HEALTH_MAX_CONNECTIONS_PER_CLIENT
            ),
        )
        health_config.load()
        sock = self._health_socket
        if sock is None:
            sock = workers.listening_socket(self.health_host, self.health_port)
        self.health_port = sock.getsockname()[1]
        self._health_server = uvicorn.Server(health_config)
        self._health_thread = _serve_in_thread(self._health_server, sock, "webhook-health")
        if not _wait_started(self._health_server, self._health_thread, timeout):
            self.stop()
            raise RuntimeError(f"the health server did not start on {self.health_url}; see the log above for why")

    def _reload_loop(self) -> None:
        while not self._stopped.wait(self.reload_interval):
            if self.reloader is not None:
                self.reloader.check()

    def drain(self) -> None:
        """Turn readiness off (the first step of a graceful stop)."""
        self.app.state.draining = True

    def stop(self) -> None:
        """Stop accepting connections, let in-flight requests finish (up to graceful_timeout), stop the cache."""
        self._stopped.set()
        self.drain()
        if self._server is not None:
            self._server.should_exit = True
        if self._health_server is not None:
            self._health_server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.graceful_timeout + 5)
        if self._health_thread is not None:
            self._health_thread.join(5)
        if self._reload_thread is not None:
            self._reload_thread.join(5)
        self.app.state.parser.close()
        if self._own_cache:
            self.cache.stop()

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _serve_in_thread(server: uvicorn.Server, sock: socket.socket, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    return thread


def _wait_started(server: uvicorn.Server, thread: threading.Thread, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def settle_garbage_collector() -> None:
    """Keep full garbage collections short: the ~70,000 objects made at import and startup (clients, FastAPI,
    prometheus) are moved out of the collector's sight, or each full collection stops the event loop ~35 ms."""
    gc.collect()
    gc.freeze()
