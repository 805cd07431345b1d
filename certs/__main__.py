"""`python -m certs`: create or renew the webhook's certificates once (for a setup Job or an init container).

    python -m certs --namespace multicluster-service-account --secret webhook-tls --service webhook \\
        --webhook-configuration multicluster-service-account [--secret-namespace NS] [--kubeconfig F] \\
        [--write-dir DIR]

Prints what it did (never the key); exits 0 when the Secret and the caBundle are right, 1 with one sentence when
not (a Job retries), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Sequence

from kubemcsa.certificates import manager
from kubemcsa.client import connect, tls
from kubemcsa.contract import api

EXIT_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m certs",
        description="Create or renew the webhook's CA and serving certificate in a Secret, and inject the CA into "
        "the MutatingWebhookConfiguration's caBundle.",
    )
    parser.add_argument("--namespace", required=True, help="namespace of the webhook's Service")
    parser.add_argument("--secret", required=True, help="name of the kubernetes.io/tls Secret to keep")
    parser.add_argument(
        "--secret-namespace",
        help="namespace of that Secret (default: --namespace; the manifests use a namespace of its own, "
        f"{api.CERT_NAMESPACE}, so that nothing but the controller writes Secrets where source credentials live)",
    )
    parser.add_argument("--service", required=True, help="name of the webhook's Service (for the DNS names)")
    parser.add_argument("--webhook-configuration", required=True, help="MutatingWebhookConfiguration to inject into")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, else KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--write-dir", help="also write tls.crt, tls.key and ca.crt into this directory")
    parser.add_argument(
        "--renew-before-days", type=int, default=tls.DEFAULT_RENEW_BEFORE.days, help="renew this long before expiry"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        api_client = connect.local_api_client(args.kubeconfig)
    except connect.LOCAL_CLIENT_ERRORS as exc:
        print(f"error: {connect.local_client_problem(exc)}", file=sys.stderr)
        return EXIT_FAILED
    try:
        with api_client:
            bundle = manager.ensure_webhook_certificates(
                api_client,
                namespace=args.namespace,
                secret_name=args.secret,
                service_name=args.service,
                webhook_configuration_name=args.webhook_configuration,
                secret_namespace=args.secret_namespace,
                renew_before=datetime.timedelta(days=args.renew_before_days),
            )
        if args.write_dir:
            cert_file, key_file = manager.write_files(bundle, args.write_dir)
            print(f"wrote {cert_file} and {key_file}")
    except manager.CertificateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for action in bundle.actions or ("nothing to do: the certificate and the caBundle are up to date",):
        print(action)
    print(f"serving certificate for {args.service}.{args.namespace}.svc valid until {bundle.not_after.isoformat()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
