"""The `kubemcsa` command (also the kubectl plugin `kubectl mcsa`): bootstrap, federate, export, status, demo.

Each command prints what it does on stdout; an error is one sentence on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import urllib3
from kubernetes.client.exceptions import ApiException

from kubemcsa.cli import allow, bootstrap, common, demo, exec_plugin, export, federate, status
from kubemcsa.cli.allow import AllowError
from kubemcsa.cli.common import EXIT_ERROR, EXIT_NOT_READY, EXIT_OK, CommandError
from kubemcsa.cli.export import ExportError
from kubemcsa.cli.federate import FederateError
from kubemcsa.client import connect, kube
from kubemcsa.client.apply import ApplyError as BootstrapError
from kubemcsa.contract.credentials import CredentialsError

__all__ = ["EXIT_ERROR", "EXIT_NOT_READY", "EXIT_OK", "CommandError", "build_parser", "main"]

# One module a command, each with `register(commands, prog)` (its parser, `run` as the default) and `run(args)`.
COMMANDS = (bootstrap, federate, allow, export, status, exec_plugin, demo)
# The failures a command turns into its one sentence on stderr.
ERRORS = (CommandError, CredentialsError, BootstrapError, AllowError, ExportError, FederateError)


def build_parser() -> argparse.ArgumentParser:
    prog = common.prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import Kubernetes service accounts from other clusters (multicluster-service-account).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=common.examples(
            f"""
            {prog} bootstrap --target-context cluster1 --source-context cluster2
            {prog} federate --target-context cluster1 --source-context cluster2
            {prog} allow pod-lister -n default --context cluster2 --to cluster1/team-a
            {prog} export pod-lister -n default --context cluster2 | kubectl --context cluster1 apply -f -
            {prog} status -A
            {prog} demo
            """
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(commands, prog)
    return parser


def _error_sentence(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"the API server refused the request: {kube.error_message(exc)}."
    problem = connect.local_file_problem(exc)
    if problem:
        return (
            f"a file on this machine could not be used ({problem}); the cluster and its configuration are not at "
            "fault: set TMPDIR to a writable directory, or fix that path."
        )
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return f"cannot reach the API server ({type(exc).__name__}); check the context, the server URL and the network."
    return str(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (the console scripts exit with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        return args.run(args)
    except (*ERRORS, ApiException, urllib3.exceptions.HTTPError) as exc:
        print(f"{parser.prog} {args.command}: error: {_error_sentence(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"{parser.prog} {args.command}: error: {_error_sentence(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
