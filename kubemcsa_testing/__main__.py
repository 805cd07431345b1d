"""`python -m kubemcsa_testing --port N --kubeconfig-out FILE`: serve an in-memory cluster until SIGINT/SIGTERM.

With `--authentication-config FILE` it trusts the JWT issuers of that AuthenticationConfiguration, as
kube-apiserver does, and reloads the file when it changes (an invalid new version is reported and ignored).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from kubemcsa_testing.oidc import ConfigurationError, parse_authentication_configuration
from kubemcsa_testing.server import ApiServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemcsa_testing", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--kubeconfig-out", required=True, help="where to write an admin kubeconfig (mode 0600)")
    parser.add_argument("--name", default="cluster1", help="cluster (and kubeconfig context) name")
    parser.add_argument("--max-token-expiration-seconds", type=int, default=None, help="cap on issued tokens' lifetime")
    parser.add_argument(
        "--authentication-config", metavar="FILE", help="an AuthenticationConfiguration whose jwt issuers it trusts"
    )
    args = parser.parse_args(argv)
    auth_text = None
    if args.authentication_config:
        try:
            auth_text = Path(args.authentication_config).read_text()
            parse_authentication_configuration(auth_text)
        except (OSError, ConfigurationError) as exc:
            print(f"--authentication-config {args.authentication_config}: {exc}", file=sys.stderr)
            return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = ApiServer(
            name=args.name,
            max_token_expiration_seconds=args.max_token_expiration_seconds,
            port=args.port,
            authentication_config=auth_text,
        ).start()
    except OSError as exc:
        print(f"cannot listen on 127.0.0.1:{args.port}: {exc.strerror}; choose another --port", file=sys.stderr)
        return 1
    try:
        server.write_kubeconfig(args.kubeconfig_out)
    except OSError as exc:
        print(f"cannot write the kubeconfig to {args.kubeconfig_out}: {exc.strerror}", file=sys.stderr)
        server.stop()
        return 1
    print(f"serving {args.name} at {server.url}; kubeconfig in {args.kubeconfig_out}", flush=True)
    while not stop.wait(1):
        if args.authentication_config:
            auth_text = _reload(server, args.authentication_config, auth_text)
    server.stop()
    return 0


def _reload(server: ApiServer, path: str, current: str | None) -> str | None:
    """Use the file's new content if it changed and is valid, as kube-apiserver reloads --authentication-config."""
    try:
        text = Path(path).read_text()
    except OSError:
        return current
    if text == current:
        return current
    try:
        server.configure_authentication(text)
    except ConfigurationError as exc:
        print(f"--authentication-config {path} changed but is invalid, keeping the previous one: {exc}", flush=True)
        return text
    print(f"--authentication-config {path} reloaded", flush=True)
    return text


if __name__ == "__main__":
    sys.exit(main())
