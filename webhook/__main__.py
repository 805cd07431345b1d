"""`python -m webhook` / `kubemcsa-webhook`: serve the admission webhook over TLS with uvicorn.

    python -m webhook --port 9443 --tls-cert-file /certs/tls.crt --tls-key-file /certs/tls.key [--kubeconfig F]
    python -m webhook --port 9443 --manage-certificates --cert-dir /run/tls   # no cert-manager needed
    python -m webhook ... --workers 2   # (default: the cores the pod may use, at most 4; 0: all in this process)

/healthz, /readyz and /metrics are also served in plain HTTP on --health-port (8080), which the webhook port's
connection caps do not count: kubelet's probes and Prometheus get through while clients hold the webhook port.

It reaches its cluster in-cluster, else through --kubeconfig or KUBECONFIG. The certificate files are watched
and reloaded into the live TLS context when they change (a renewal drops no request). With
--manage-certificates, the webhook itself keeps the CA, the serving certificate (in a Secret shared by all
replicas) and the MutatingWebhookConfiguration's caBundle up to date (kubemcsa.certificates.manager). SIGTERM:
readiness turns
off, and after --shutdown-delay seconds (for the endpoints to forget this pod) in-flight requests finish.
With --workers N, this process watches the cluster and N serving processes share the port (webhook.workers).
The flags are webhook.cli's; the server, webhook.server's: this module only runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from kubemcsa.certificates.reloader import RenewalLoop
from kubemcsa.client import connect
from kubemcsa.contract import api
from webhook import workers
from webhook.cli import build_parser
from webhook.connections import ConnectionLimits
from webhook.server import WebhookServer, settle_garbage_collector

if TYPE_CHECKING:
    from kubernetes import client

# The Kubernetes client (kubemcsa.certificates.manager, kubemcsa.client.kube, webhook.cache) is imported where it is
# used, so that
# importing this module stays as light as the serving workers (webhook.worker) need theirs to be.

log = logging.getLogger("webhook")

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 0:
        print("error: --workers takes a number of processes, 0 or more (0: serve in this process)", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = _certificate_files(args)
    if isinstance(files, str):
        print(f"error: {files}", file=sys.stderr)
        return EXIT_USAGE
    cert_file, key_file = files
    try:
        api_client = connect.local_api_client(args.kubeconfig)
    except connect.LOCAL_CLIENT_ERRORS as exc:
        print(f"error: {connect.local_client_problem(exc)}", file=sys.stderr)
        return EXIT_FAILED
    stop = _stop_on_signals()
    renewal: RenewalLoop | None = None
    if args.manage_certificates:
        renewal = _first_certificates(args, api_client, stop)
        if renewal is None:  # stopped before a trusted certificate existed
            return EXIT_FAILED
    count = workers.default_workers() if args.workers is None else args.workers
    if count > 0:
        return _serve_with_workers(args, api_client, cert_file, key_file, count, renewal, stop)
    return _serve_here(args, api_client, cert_file, key_file, renewal, stop)


def _certificate_files(args: argparse.Namespace) -> tuple[str, str] | str:
    """(certificate file, key file) to serve with, or what is wrong with the flags that name them."""
    from kubemcsa.certificates import manager

    if args.manage_certificates:
        if args.tls_cert_file or args.tls_key_file:
            return "with --manage-certificates, choose where the files go with --cert-dir"
        return os.path.join(args.cert_dir, manager.CERT_FILE), os.path.join(args.cert_dir, manager.KEY_FILE)
    if args.tls_cert_file and args.tls_key_file:
        return args.tls_cert_file, args.tls_key_file
    return "pass --tls-cert-file and --tls-key-file, or --manage-certificates"


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def _own_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as file:
            return file.read().strip() or api.SYSTEM_NAMESPACE
    except OSError:
        return api.SYSTEM_NAMESPACE


def _first_certificates(
    args: argparse.Namespace, api_client: client.ApiClient, stop: threading.Event
) -> RenewalLoop | None:
    """The renewal loop of --manage-certificates, once it has made a trusted certificate (None: stopped first)."""
    from kubemcsa.certificates import manager

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
            return renewal
        except (manager.CertificateError, OSError) as exc:
            log.warning("cannot set up the webhook's certificates yet, retrying in %.0fs: %s", delay, exc)
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 30)


def _connection_limits(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(
        request_read_timeout=args.request_read_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        idle_timeout=args.idle_timeout,
    )


def _cannot_serve(args: argparse.Namespace, cert_file: str, exc: Exception) -> None:
    health = f" (health on port {args.health_port})" if args.health_port else ""
    print(f"error: cannot serve on {args.host}:{args.port}{health} with {cert_file} ({exc})", file=sys.stderr)


def _serve_here(
    args: argparse.Namespace,
    api_client: client.ApiClient,
    cert_file: str,
    key_file: str,
    renewal: RenewalLoop | None,
    stop: threading.Event,
) -> int:
    """Watch and serve in this process until `stop`; then drain and stop."""
    server = WebhookServer(
        api_client,
        cert_file,
        key_file,
        host=args.host,
        port=args.port,
        limits=_connection_limits(args),
        health_port=args.health_port or None,
    )
    try:
        server.start()
        settle_garbage_collector()
    except (OSError, RuntimeError, ValueError) as exc:
        _cannot_serve(args, cert_file, exc)
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
        limits=_connection_limits(args),
        health_port=args.health_port or None,
        metrics_dir=args.metrics_dir,
        log_level=args.log_level,
    )
    try:
        pool.start()
        settle_garbage_collector()
    except (OSError, RuntimeError, ValueError) as exc:
        _cannot_serve(args, cert_file, exc)
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
