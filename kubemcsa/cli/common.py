"""What every `kubemcsa` command shares: exit codes, the one-sentence error, help examples, the cluster-pair flags."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

EXIT_OK = 0
EXIT_NOT_READY = 1  # `status`: some import is not ready
EXIT_ERROR = 2  # bad usage or a failure


class CommandError(Exception):
    """A failure the user can fix; the message is the one sentence printed on stderr."""


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


def prog() -> str:
    name = os.path.basename(sys.argv[0] or "kubemcsa")
    return "kubectl mcsa" if name.startswith("kubectl-mcsa") else "kubemcsa"


def add_cluster_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The target (pods run there) and source (they call it) of bootstrap and federate."""
    parser.add_argument("--target-context", required=True, help="kubeconfig context of the cluster to import INTO")
    parser.add_argument("--source-context", required=True, help="kubeconfig context of the cluster to import FROM")
    parser.add_argument("--target-kubeconfig", help="kubeconfig file for the target (default: $KUBECONFIG)")
    parser.add_argument("--source-kubeconfig", help="kubeconfig file for the source (default: $KUBECONFIG)")
    parser.add_argument("--target-name", help="name of the target cluster (default: the context's cluster name)")
    parser.add_argument(
        "--source-name",
        help="name of the source cluster, i.e. the clusterName imports use (default: the context's cluster name)",
    )
