"""`kubemcsa demo`: the Getting Started flow on two in-memory clusters. Its body lives with the in-memory API server
(kubemcsa_testing.demo), which production code never imports: it is loaded by name, and a plain install or the image
that lacks it says how to get it."""

from __future__ import annotations

import argparse
import importlib

from kubemcsa.cli.common import CommandError, examples


def register(commands: argparse._SubParsersAction, prog: str) -> None:
    demo = commands.add_parser(
        "demo",
        help="play the Getting Started flow on two in-memory clusters, printing each step",
        description=(
            "Start two in-memory clusters, the controller and the admission webhook, then play the Getting Started "
            "flow: a service account in cluster2, its import in cluster1, an annotated pod admitted with the "
            "Secret mounted, and a client built from the mount listing cluster2's pods. Nothing is installed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=examples(
            f"""
            {prog} demo
            {prog} demo --keep-running    # leave the clusters up and print their kubeconfig paths
            {prog} demo --federated       # the federated trust mode: no token copied anywhere
            """
        ),
    )
    demo.add_argument(
        "--keep-running", action="store_true", help="leave everything running until Ctrl-C (prints kubeconfigs)"
    )
    demo.add_argument(
        "--federated",
        action="store_true",
        help="play the federated trust mode: cluster2 trusts cluster1's own tokens, no token is copied",
    )
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        # By name: the demo lives with the in-memory API server, which production code never imports (the image and a
        # plain install leave it out, and this command then says how to get it).
        demo = importlib.import_module("kubemcsa_testing.demo")
    except ImportError as exc:  # kubemcsa_testing or a dependency of it: the image and plain installs leave them out
        raise CommandError(
            f"the demo needs the in-memory API server and its dependencies ({exc.name or exc} is missing), which "
            "this installation leaves out; install the demo extra: pip install 'multicluster-service-account[demo]' "
            "(pip install '.[demo]' in a source checkout)."
        ) from None

    return demo.main(keep_running=args.keep_running, federated=args.federated)
