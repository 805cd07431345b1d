"""`python -m controller` / `kubemcsa-controller`: run the ServiceAccountImport controller until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

from controller.options import DEFAULT_WORKERS
from kubemcsa.client import connect
from kubemcsa.contract import api


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubemcsa-controller", description=__doc__)
    parser.add_argument("--kubeconfig", help="kubeconfig of the local cluster (default: in-cluster, then KUBECONFIG)")
    parser.add_argument("--source-kubeconfig", help="kubeconfig whose contexts are source clusters (context = name)")
    parser.add_argument("--imports-dir", default=api.MOUNT_ROOT, help="where service-account imports are mounted")
    parser.add_argument(
        "--cluster-name",
        help="this cluster's name in the --source-kubeconfig clusters, which owners export to (kubemcsa allow --to "
        "NAME/namespace); bootstrap credentials carry it already",
    )
    parser.add_argument("--namespace", help="watch only this namespace (default: all)")
    parser.add_argument("--system-namespace", default=api.SYSTEM_NAMESPACE, help="namespace of the Lease and sources")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on this port")
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"imports reconciled at once (default {DEFAULT_WORKERS}); raise it for slow or many source clusters",
    )
    parser.add_argument(
        "--source-qps",
        type=float,
        default=5.0,
        help="token requests per second to each source cluster, at most (default 5, as client-go)",
    )
    parser.add_argument(
        "--source-burst", type=int, default=10, help="token requests at once to each source cluster (default 10)"
    )
    parser.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--identity", help="leader election identity (default: hostname and a random suffix)")
    parser.add_argument(
        "--trust-check-service-account",
        "--service-account",  # its earlier name
        dest="trust_check_service_account",
        metavar="NAMESPACE/NAME",
        help="federated imports: the service account whose tokens check a source's trust; bind it to nothing "
        f"(default: {api.TRUST_CHECK_SERVICE_ACCOUNT} of --system-namespace)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, in one sentence, or None."""
    if args.workers < 1:
        return "--workers must be at least 1."
    if args.source_qps <= 0 or args.source_burst < 1:
        return "--source-qps must be above 0 and --source-burst at least 1."
    if args.cluster_name is not None and not api.is_dns_subdomain(args.cluster_name):
        return f"--cluster-name {args.cluster_name!r} is not a cluster name."
    if args.trust_check_service_account is not None:
        from controller.trust_checks import parse_service_account

        try:
            parse_service_account(args.trust_check_service_account)
        except ValueError as exc:
            return f"--trust-check-service-account {exc}."
    return None


def options_from(args: argparse.Namespace) -> Any:
    from controller.options import Options  # imported late so --help is fast

    return Options(
        source_kubeconfig=args.source_kubeconfig,
        imports_dir=args.imports_dir,
        cluster_name=args.cluster_name,
        namespace=args.namespace,
        system_namespace=args.system_namespace,
        leader_election=args.leader_election,
        identity=args.identity,
        metrics_port=args.metrics_port,
        workers=args.workers,
        source_qps=args.source_qps,
        source_burst=args.source_burst,
        trust_check_service_account=args.trust_check_service_account,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = usage_problem(args)
    if problem:
        print(f"kubemcsa-controller: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from controller.run import Controller
    from controller.runtime.malloc import tune_for_long_running

    tune_for_long_running()

    try:
        client = connect.local_api_client(args.kubeconfig)
    except connect.LOCAL_CLIENT_ERRORS as exc:
        print(f"kubemcsa-controller: {connect.local_client_problem(exc)}.", file=sys.stderr)
        return 2
    if args.source_kubeconfig and not os.path.exists(args.source_kubeconfig):
        logging.getLogger(__name__).warning(
            "--source-kubeconfig %s does not exist yet; watching for it", args.source_kubeconfig
        )
    controller = Controller(client, options_from(args))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    controller.start()
    try:
        while not stop.wait(0.2):
            if controller.fatal:
                print(f"kubemcsa-controller: {controller.fatal}", file=sys.stderr)
                return 2
    finally:
        controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
