"""The command line of `kubemcsa-webhook` / `python -m webhook`: its flags, their defaults, the names it manages.

Only the parser: webhook.__main__ runs what the flags say.
"""

from __future__ import annotations

import argparse

from kubemcsa.contract import api
from webhook import connections, workers

SERVICE_NAME = "service-account-import-admission-controller"
WEBHOOK_CONFIGURATION_NAME = "service-account-import-admission-controller"
CERT_SECRET_NAME = "service-account-import-admission-controller-cert"
DEFAULT_PORT = 9443
DEFAULT_HEALTH_PORT = 8080


def build_parser() -> argparse.ArgumentParser:
    """The webhook's argument parser (every flag, in the order --help lists them)."""
    parser = argparse.ArgumentParser(
        prog="kubemcsa-webhook",
        description="Serve the admission webhook that mounts ServiceAccountImport Secrets into annotated pods.",
    )
    _add_serving(parser)
    _add_certificate_management(parser.add_argument_group("certificate management (instead of cert-manager)"))
    _add_connection_handling(parser)
    _add_processes(parser)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _add_serving(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTPS port (default: {DEFAULT_PORT})")
    parser.add_argument("--tls-cert-file", help="serving certificate (PEM), e.g. from a cert-manager Secret")
    parser.add_argument("--tls-key-file", help="its private key (PEM)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else KUBECONFIG or ~/.kube/config)")


def _add_certificate_management(certs: argparse._ArgumentGroup) -> None:
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


def _add_connection_handling(parser: argparse.ArgumentParser) -> None:
    # How connections are held and let go: drained on SIGTERM, dropped when slow, idle or too many.
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


def _add_processes(parser: argparse.ArgumentParser) -> None:
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
