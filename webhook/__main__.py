"""`python -m webhook` / `kubemcsa-webhook`: serve the admission webhook over TLS with uvicorn.

    python -m webhook --port 9443 --tls-cert-file /certs/tls.crt --tls-key-file /certs/tls.key [--kubeconfig F]
    python -m webhook --port 9443 --manage-certificates --cert-dir /run/tls   # no cert-manager needed
    python -m webhook ... --workers 2   # (default: the cores the pod may use, at most 4; 0: all in this process)

/healthz, /readyz and /metrics are also served in plain HTTP on --health-port (8080), which the webhook port's
connection caps do not count: kubelet's probes and Prometheus get through while clients hold the webhook port.

It reaches its cluster in-cluster, else through --kubeconfig or KUBECONFIG. The certificate files are watched
and reloaded into the live TLS context when they change (a renewal drops no request). With
--manage-certificates, the webhook itself keeps the CA, the serving certificate (in a Secret shared by all
replicas) and the MutatingWebhookConfiguration's caBundle up to date (certs.manager). SIGTERM: readiness turns
off, and after --shutdown-delay seconds (for the endpoints to forget this pod) in-flight requests finish.
With --workers N, this process watches the cluster and N serving processes share the port (webhook.workers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from certs.reloader import CertificateReloader, RenewalLoop
from kubemcsa import api
from webhook import coalesce, connections, workers
from webhook.app import WebhookCache, create_app, create_health_app

if TYPE_CHECKING:
    from kubernetes import client
    from prometheus_client import CollectorRegistry

# The Kubernetes client (certs.manager, kubemcsa.kube, webhook.cache) is imported where it is used: the serving
# workers (webhook.worker) import this module for WebhookServer, and never talk to the API server themselves.

log = logging.getLogger("webhook")

SERVICE_NAME = "service-account-import-admission-controller"
WEBHOOK_CONFIGURATION_NAME = "service-account-import-admission-controller"
CERT_SECRET_NAME = "service-account-import-admission-controller-cert"
DEFAULT_PORT = 9443
DEFAULT_HEALTH_PORT = 8080
HEALTH_MAX_CONNECTIONS = 256
HEALTH_MAX_CONNECTIONS_PER_CLIENT = 16
EXIT_FAILED = 1


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
        request_read_timeout: float = connections.DEFAULT_REQUEST_READ_TIMEOUT,
        max_connections: int = connections.DEFAULT_MAX_CONNECTIONS,
        max_connections_per_client: int = connections.DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        idle_timeout: float = connections.DEFAULT_IDLE_TIMEOUT,
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
        self.request_read_timeout = request_read_timeout
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.idle_timeout = idle_timeout
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
            timeout_keep_alive=self.idle_timeout,
            # Slow or idle clients are dropped after request_read_timeout, at most max_connections are open, and
            # at most max_connections_per_client from one address. Each answer in one TLS record and one send
            # (webhook.coalesce).
            http=coalesce.coalescing(
                connections.guarded_protocol(
                    self.request_read_timeout, self.max_connections, self.max_connections_per_client
                )
            ),
        )
        uvicorn_config.load()  # Raises here, in the caller's thread, if the certificate files are unusable.
        sock = self._listen_socket
        if sock is None:
            sock = workers.listening_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._server = _Server(uvicorn_config)
        self._server.handshake_timeout = self.request_read_timeout
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
            timeout_keep_alive=self.idle_timeout,
            # Kubelet's probes come from the node, Prometheus from its pod: a few connections per address suffice,
            # and one client holding many cannot fail another's probes.
            http=connections.guarded_protocol(
                self.request_read_timeout, HEALTH_MAX_CONNECTIONS, HEALTH_MAX_CONNECTIONS_PER_CLIENT
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubemcsa-webhook",
        description="Serve the admission webhook that mounts ServiceAccountImport Secrets into annotated pods.",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTPS port (default: {DEFAULT_PORT})")
    parser.add_argument("--tls-cert-file", help="serving certificate (PEM), e.g. from a cert-manager Secret")
    parser.add_argument("--tls-key-file", help="its private key (PEM)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else KUBECONFIG or ~/.kube/config)")
    certs = parser.add_argument_group("certificate management (instead of cert-manager)")
    certs.add_argument(
        "--manage-certificates",
        action="store_true",
        help="create and renew the CA and serving certificate in a Secret, inject the CA into the webhook "
        "configuration's caBundle, and write the files into --cert-dir",
    )
    certs.add_argument("--cert-dir", default="/tmp/webhook-tls", help="where to write tls.crt and tls.key")  # noqa: S108
    certs.add_argument(
        "--namespace",
        default=None,
        help=f"namespace of the Service (default: the pod's own, else {api.SYSTEM_NAMESPACE})",
    )
    certs.add_argument(
        "--cert-namespace",
        default=api.CERT_NAMESPACE,
        help=f"namespace of the certificate Secret (default: {api.CERT_NAMESPACE}, a namespace of its own: the "
        "webhook may write no Secret where the controller's source credentials live)",
    )
    certs.add_argument("--service", default=SERVICE_NAME, help="the webhook's Service (for the DNS names)")
    certs.add_argument("--cert-secret", default=CERT_SECRET_NAME, help="Secret holding the CA and certificate")
    certs.add_argument(
        "--webhook-configuration", default=WEBHOOK_CONFIGURATION_NAME, help="MutatingWebhookConfiguration to inject"
    )
    certs.add_argument("--renew-interval", type=float, default=3600.0, help="seconds between certificate checks")
    parser.add_argument(
        "--shutdown-delay",
        type=float,
        default=5.0,
        help="seconds between SIGTERM and closing the listener, while endpoints stop sending traffic",
    )
    parser.add_argument(
        "--request-read-timeout",
        type=float,
        default=connections.DEFAULT_REQUEST_READ_TIMEOUT,
        help="seconds a client has to send a whole request (and to finish its TLS handshake) before it is dropped",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=connections.DEFAULT_MAX_CONNECTIONS,
        help="open connections kept at most; beyond, a new one closes an idle one of the client holding the most, "
        "or is closed at once",
    )
    parser.add_argument(
        "--max-connections-per-client",
        type=int,
        default=connections.DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        help="open connections one client address may hold; newer ones are closed at once "
        f"(default: {connections.DEFAULT_MAX_CONNECTIONS_PER_CLIENT})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=connections.DEFAULT_IDLE_TIMEOUT,
        help="seconds a kept-alive connection may stay idle between requests before it is closed "
        f"(default: {connections.DEFAULT_IDLE_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=DEFAULT_HEALTH_PORT,
        help="plain-HTTP port of /healthz, /readyz and /metrics, outside the webhook port's connection caps; "
        f"0 for none (default: {DEFAULT_HEALTH_PORT})",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="serving processes sharing the port, fed by this process's one watch of the cluster (default: the "
        f"cores the pod may use, at most {workers.DEFAULT_MAX_WORKERS}; 0: serve in this process)",
    )
    parser.add_argument(
        "--metrics-dir",
        default=None,
        help="with --workers, where the workers keep their metrics for /metrics to add up (emptied at start; "
        "default: a new directory in /dev/shm, memory that a read-only root filesystem leaves writable)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _own_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            return file.read().strip() or api.SYSTEM_NAMESPACE
    except OSError:
        return api.SYSTEM_NAMESPACE


def main(argv: Sequence[str] | None = None) -> int:
    from certs import manager
    from kubemcsa import kube

    args = _parser().parse_args(argv)
    if args.workers is not None and args.workers < 0:
        print("error: --workers takes a number of processes, 0 or more (0: serve in this process)", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.manage_certificates:
        if args.tls_cert_file or args.tls_key_file:
            print("error: with --manage-certificates, choose where the files go with --cert-dir", file=sys.stderr)
            return 2
        cert_file = os.path.join(args.cert_dir, manager.CERT_FILE)
        key_file = os.path.join(args.cert_dir, manager.KEY_FILE)
    elif args.tls_cert_file and args.tls_key_file:
        cert_file, key_file = args.tls_cert_file, args.tls_key_file
    else:
        print("error: pass --tls-cert-file and --tls-key-file, or --manage-certificates", file=sys.stderr)
        return 2
    try:
        api_client = kube.local_api_client(args.kubeconfig)
    except kube.LOCAL_CLIENT_ERRORS as exc:
        print(f"error: {kube.local_client_problem(exc)}", file=sys.stderr)
        return EXIT_FAILED

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    renewal: RenewalLoop | None = None
    if args.manage_certificates:
        renewal = RenewalLoop(
            api_client,
            namespace=args.namespace or _own_namespace(),
            secret_name=args.cert_secret,
            secret_namespace=args.cert_namespace,
            service_name=args.service,
            webhook_configuration_name=args.webhook_configuration,
            directory=args.cert_dir,
            interval_seconds=args.renew_interval,
        )
        # Serve only once a trusted certificate exists; retry until then (RBAC or the configuration may lag).
        delay = 1.0
        while True:
            try:
                renewal.run_once()
                break
            except (manager.CertificateError, OSError) as exc:
                log.warning("cannot set up the webhook's certificates yet, retrying in %.0fs: %s", delay, exc)
            if stop.wait(delay):
                return EXIT_FAILED
            delay = min(delay * 2, 30)

    count = workers.default_workers() if args.workers is None else args.workers
    if count > 0:
        return _serve_with_workers(args, api_client, cert_file, key_file, count, renewal, stop)
    server = WebhookServer(
        api_client,
        cert_file,
        key_file,
        host=args.host,
        port=args.port,
        request_read_timeout=args.request_read_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        idle_timeout=args.idle_timeout,
        health_port=args.health_port or None,
    )
    try:
        server.start()
        settle_garbage_collector()
    except (OSError, RuntimeError, ValueError) as exc:
        health = f" (health on port {args.health_port})" if args.health_port else ""
        print(f"error: cannot serve on {args.host}:{args.port}{health} with {cert_file} ({exc})", file=sys.stderr)
        return EXIT_FAILED
    try:
        server.app.state.parser.warm()  # the worker process for large requests, ready before the first one
    except (OSError, RuntimeError) as exc:
        log.warning("the worker process for large requests could not start yet (%s); it is retried on use", exc)
    if renewal is not None:
        renewal.reloader = server.reloader
        renewal.start()
    try:
        while not stop.wait(1.0):
            if server._thread is not None and not server._thread.is_alive():
                log.error("the HTTP server stopped unexpectedly; exiting so that the pod restarts")
                return EXIT_FAILED
        log.info("stopping: not ready any more, closing in %.0fs", args.shutdown_delay)
        server.drain()
        time.sleep(args.shutdown_delay)
    finally:
        if renewal is not None:
            renewal.stop()
        server.stop()
        with contextlib.suppress(Exception):
            api_client.close()
    return 0


def _serve_with_workers(
    args: argparse.Namespace,
    api_client: client.ApiClient,
    cert_file: str,
    key_file: str,
    count: int,
    renewal: RenewalLoop | None,
    stop: threading.Event,
) -> int:
    """Watch here, serve in `count` worker processes sharing the port, until `stop`; then drain and stop them."""
    from webhook.cache import WatchCache

    cache = WatchCache(api_client).start()
    pool = workers.WorkerPool(
        cache,
        cert_file,
        key_file,
        host=args.host,
        port=args.port,
        workers=count,
        request_read_timeout=args.request_read_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        idle_timeout=args.idle_timeout,
        health_port=args.health_port or None,
        metrics_dir=args.metrics_dir,
        log_level=args.log_level,
    )
    try:
        pool.start()
        settle_garbage_collector()
    except (OSError, RuntimeError, ValueError) as exc:
        health = f" (health on port {args.health_port})" if args.health_port else ""
        print(f"error: cannot serve on {args.host}:{args.port}{health} with {cert_file} ({exc})", file=sys.stderr)
        pool.stop()
        cache.stop()
        return EXIT_FAILED
    if renewal is not None:
        renewal.start()  # it writes the files; every worker reloads them by itself
    try:
        while not stop.wait(1.0):  # (a timeout, so that the signal handler runs promptly)
            pass
        log.info("stopping: not ready any more, closing in %.0fs", args.shutdown_delay)
        pool.drain()
        time.sleep(args.shutdown_delay)
    finally:
        if renewal is not None:
            renewal.stop()
        pool.stop()
        cache.stop()
        with contextlib.suppress(Exception):
            api_client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
