"""`python -m kubemcsa.testing --port N --kubeconfig-out FILE`: serve an in-memory cluster until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from kubemcsa.testing.server import ApiServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemcsa.testing", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--kubeconfig-out", required=True, help="where to write an admin kubeconfig (mode 0600)")
    parser.add_argument("--name", default="cluster1", help="cluster (and kubeconfig context) name")
    parser.add_argument("--max-token-expiration-seconds", type=int, default=None, help="cap on issued tokens' lifetime")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = ApiServer(
            name=args.name, max_token_expiration_seconds=args.max_token_expiration_seconds, port=args.port
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
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
