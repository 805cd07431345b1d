"""The `kubemcsa` command (also the kubectl plugin `kubectl mcsa`): bootstrap, federate, export, status, demo.

Each command prints what it does on stdout; an error is one sentence on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import sys
import textwrap
import time
from collections.abc import Sequence

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli import exec_plugin
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.credentials import CredentialsError

EXIT_OK = 0
EXIT_NOT_READY = 1  # `status`: some import is not ready
EXIT_ERROR = 2  # bad usage or a failure


class CommandError(Exception):
    """A failure the user can fix; the message is the one sentence printed on stderr."""


def _examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip("\n"), "  ")


def _prog() -> str:
    name = os.path.basename(sys.argv[0] or "kubemcsa")
    return "kubectl mcsa" if name.startswith("kubectl-mcsa") else "kubemcsa"


def _add_cluster_pair_arguments(parser: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    prog = _prog()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import Kubernetes service accounts from other clusters (multicluster-service-account).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
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
    exec_plugin.add_parser(commands, prog)

    boot = commands.add_parser(
        "bootstrap",
        help="let the controller of a target cluster import service accounts from a source cluster",
        description=(
            "In the source cluster, create the namespace multicluster-service-account, a service account named "
            "after the target cluster and the least RBAC the controller needs: request tokens for that account "
            "only, and list and watch service accounts to see which their owners export to it (kubemcsa allow). "
            "In the target cluster, create a ServiceAccountImport named after the source cluster for that "
            "service account, and its first Secret, so that the controller reaches the source at once. Running it "
            "again changes nothing and says so."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            f"""
            {prog} bootstrap --target-context cluster1 --source-context cluster2
            {prog} bootstrap --target-context c1 --source-context c2 --target-kubeconfig c1 --source-kubeconfig c2
            {prog} bootstrap --target-context c1 --source-context c2 --source-namespaces team-a,team-b
            {prog} bootstrap --target-context c1 --source-context c2 --wait 60   # until the controller uses it
            {prog} bootstrap --target-context kind-a --source-context kind-b --source-server https://10.0.0.7:6443
            """
        ),
    )
    _add_cluster_pair_arguments(boot)
    boot.add_argument(
        "--source-namespaces",
        metavar="NS[,NS...]",
        help="grant access in these source namespaces only (default: all namespaces)",
    )
    boot.add_argument(
        "--legacy-tokens",
        action="store_true",
        help="also let the controller read service accounts and create and read legacy token Secrets in the source "
        "(clusters before 1.22); needs --allow-all-service-accounts",
    )
    boot.add_argument(
        "--allow-all-service-accounts",
        action="store_true",
        help="DANGEROUS: the original's open model; let the controller get a token for ANY service account of the "
        "source (in --source-namespaces), without its owner's export",
    )
    boot.add_argument(
        "--credential-duration",
        default="30d",
        metavar="DURATION",
        help="lifetime of the controller's own credential for the source, rotated by the controller at 80 %% "
        "(default: 30d; a source outage shorter than a fifth of it heals by itself)",
    )
    boot.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for the target's controller to report the bootstrap import Ready (default: no wait)",
    )
    boot.add_argument(
        "--source-server",
        metavar="URL",
        help="URL the target reaches the source at, if not the one in the source kubeconfig (e.g. kind clusters)",
    )

    fed = commands.add_parser(
        "federate",
        help="let a source cluster trust the target cluster's own service-account tokens (no token copied)",
        description=(
            "Federated trust: pods of the target cluster call the source cluster with their own projected tokens. "
            "federate reads the target's service-account issuer, creates in the target the ClusterRoleBinding that "
            "lets anyone (the source's API server included) read its public discovery document and signing keys "
            "(--no-discovery-binding to skip), records the federated source in the target's namespace "
            "multicluster-service-account (a ConfigMap the controller picks up at once), and prints the "
            "AuthenticationConfiguration to add to the source's kube-apiserver, which no client can change. "
            "--check only asks the source whether it trusts the target already, and as which user."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            f"""
            {prog} federate --target-context cluster1 --source-context cluster2
            {prog} federate --target-context cluster1 --source-context cluster2 --check
            {prog} federate --target-context c1 --source-context c2 --audience c2.example --user-prefix c1:
            """
        ),
    )
    _add_cluster_pair_arguments(fed)
    fed.add_argument(
        "--audience",
        dest="audiences",
        action="append",
        help="audience the source accepts; repeat it to allow imports (spec.audiences) several, the first being "
        "the default (default: the source cluster's name). Only these may be asked for by imports of the source",
    )
    fed.add_argument(
        "--user-prefix", help="prefix of the user names the source gives the target's pods (default: '<target>:')"
    )
    fed.add_argument(
        "--no-discovery-binding",
        action="store_true",
        help="do not let anonymous clients read the target's discovery document and keys (serve them another way)",
    )
    fed.add_argument(
        "--source-server", metavar="URL", help="URL the target's pods reach the source at (default: the kubeconfig's)"
    )
    fed.add_argument(
        "--target-server",
        metavar="URL",
        help="URL the source's API server reaches the target at, for discovery (default: the kubeconfig's)",
    )
    fed.add_argument(
        "--check", action="store_true", help="only check whether the source trusts the target; exit 1 if not"
    )

    for verb in ("allow", "disallow"):
        _add_allow_parser(commands, prog, verb)

    exp = commands.add_parser(
        "export",
        help="print a Secret with a service account's credentials, for kubectl apply in another cluster",
        description=(
            "Print a Secret manifest (YAML) with the keys ca.crt, namespace, token, server and config for service "
            "account NAME, ready for `kubectl apply -f -` in another cluster. The token comes from the TokenRequest "
            "API (its real expiry is in an annotation); --legacy makes a long-lived token Secret instead. The output "
            "contains a token: pipe it, do not paste it into tickets."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            f"""
            {prog} export pod-lister -n default --context cluster2 | kubectl --context cluster1 apply -f -
            {prog} export ci-bot -n ci --as cluster2-ci-bot --duration 24h --audience https://kubernetes.default.svc
            {prog} export old-bot --legacy --context cluster-1-21 > old-bot-secret.yaml
            """
        ),
    )
    exp.add_argument("name", metavar="NAME", help="the service account to export")
    exp.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    exp.add_argument("--context", help="kubeconfig context of the cluster that has the service account")
    exp.add_argument("-n", "--namespace", help="namespace of the service account (default: the context's)")
    exp.add_argument("--as", dest="export_name", metavar="EXPORT_NAME", help="name of the Secret (default: NAME-token)")
    exp.add_argument(
        "--audience",
        dest="audiences",
        action="append",
        metavar="AUDIENCE",
        help="audience of the token (repeatable; default: the API server's own)",
    )
    exp.add_argument(
        "--duration",
        metavar="DURATION",
        help="how long the token is valid, e.g. 3600s, 90m, 24h (default: the API server's; it may cap it)",
    )
    exp.add_argument("--legacy", action="store_true", help="export a long-lived token from a token Secret instead")

    stat = commands.add_parser(
        "status",
        help="list ServiceAccountImports with their readiness, reason and token expiry",
        description=(
            "Show each ServiceAccountImport with its source cluster, remote service account, Ready condition, "
            "reason and time to token expiry, then what to fix for each one that is not ready. Exit status 1 if any "
            "import is not ready, so scripts can check."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            f"""
            {prog} status
            {prog} status -A
            {prog} status -n multicluster-service-account --context cluster1 || echo "some import is broken"
            """
        ),
    )
    stat.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    stat.add_argument("--context", help="kubeconfig context (default: the current one)")
    scope = stat.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="namespace to list (default: the context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="list imports of all namespaces")

    demo = commands.add_parser(
        "demo",
        help="play the Getting Started flow on two in-memory clusters, printing each step",
        description=(
            "Start two in-memory clusters, the controller and the admission webhook, then play the Getting Started "
            "flow: a service account in cluster2, its import in cluster1, an annotated pod admitted with the "
            "Secret mounted, and a client built from the mount listing cluster2's pods. Nothing is installed."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
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
    return parser


def _add_allow_parser(commands: argparse._SubParsersAction, prog: str, verb: str) -> None:
    allow = verb == "allow"
    cmd = commands.add_parser(
        verb,
        help=(
            "export a service account to consumer clusters and namespaces (as its owner, in its cluster)"
            if allow
            else "withdraw a service account's export from consumer clusters and namespaces"
        ),
        description=(
            "As the owner of service account NAME, let namespaces of consumer clusters import it: in its namespace, "
            "a Role and RoleBinding let each consumer cluster's controller request its tokens (the cluster's RBAC "
            "enforces that), and its label multicluster.admiralty.io/exported and annotation "
            "multicluster.admiralty.io/export-to say which namespaces of those clusters may (their controllers "
            "enforce that). Running it again changes nothing."
            if allow
            else "Withdraw the export of service account NAME from the CLUSTER/NAMESPACE patterns given (--to), or "
            "from everyone (--all): its annotation loses them, and consumer clusters no longer named lose the RBAC to "
            "request its tokens. Imports of it turn NotExported and lose their token within seconds; tokens "
            "already issued stay valid until they expire."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            f"""
            {prog} allow pod-lister -n default --context cluster2 --to cluster1/team-a
            {prog} allow deployer -n ci --context cluster2 --to 'cluster1/ci-*,cluster3/*'
            """
            if allow
            else f"""
            {prog} disallow pod-lister -n default --context cluster2 --to cluster1/team-a
            {prog} disallow deployer -n ci --context cluster2 --all
            """
        ),
    )
    cmd.add_argument("name", metavar="NAME", help="the service account")
    cmd.add_argument("-n", "--namespace", help="namespace of the service account (default: the context's)")
    cmd.add_argument("--context", help="kubeconfig context of the service account's (source) cluster")
    cmd.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    to_help = (
        "consumer CLUSTER/NAMESPACE, comma-separated or repeated; '*' globs the namespace (cluster1/ci-*); "
        "CLUSTER is the name bootstrap gave the consumer cluster"
    )
    if allow:
        cmd.add_argument("--to", action="append", required=True, metavar="CLUSTER/NAMESPACE[,...]", help=to_help)
    else:
        which = cmd.add_mutually_exclusive_group(required=True)
        which.add_argument("--to", action="append", metavar="CLUSTER/NAMESPACE[,...]", help=to_help)
        which.add_argument("--all", action="store_true", help="withdraw the export from every consumer")


# --- commands --------------------------------------------------------------------------------------------------


def _run_bootstrap(args: argparse.Namespace) -> int:
    from kubemcsa.cli import bootstrap
    from kubemcsa.cli.export import parse_duration

    try:
        credential_seconds = parse_duration(args.credential_duration)
    except ValueError as exc:
        raise CommandError(f"--credential-duration {exc}") from None
    source_info = config.context_cluster_info(args.source_context, args.source_kubeconfig)
    target_info = config.context_cluster_info(args.target_context, args.target_kubeconfig)
    the_plan = bootstrap.plan(
        args.target_name or target_info.cluster_name,
        args.source_name or source_info.cluster_name,
        source_namespaces=args.source_namespaces.split(",") if args.source_namespaces is not None else None,
        legacy_tokens=args.legacy_tokens,
        credential_seconds=credential_seconds,
        allow_all_service_accounts=args.allow_all_service_accounts,
    )
    if the_plan.allow_all_service_accounts:
        print(bootstrap.allow_all_warning(the_plan), file=sys.stderr, flush=True)
    source_server = (args.source_server or source_info.server).rstrip("/")
    if not source_server.startswith("https://"):
        raise CommandError(f"--source-server {source_server!r} is not an https:// URL; give the API server's URL.")
    source_client = config.context_config_and_namespace(source_info.context, args.source_kubeconfig).api_client()
    target_client = config.context_config_and_namespace(target_info.context, args.target_kubeconfig).api_client()
    try:
        print(
            f"Bootstrapping target cluster {the_plan.target_name!r} (context {target_info.context!r}) to import from "
            f"source cluster {the_plan.source_name!r} (context {source_info.context!r})",
            flush=True,
        )
        result = bootstrap.apply(
            the_plan,
            bootstrap.Cluster("source", the_plan.source_name, source_client, source_server, source_info.ca_pem),
            bootstrap.Cluster("target", the_plan.target_name, target_client, target_info.server),
            report=lambda line: print(line, flush=True),
        )
        print(result.summary(), flush=True)
        if args.wait > 0:
            _wait_for_bootstrap_import(target_client, the_plan.import_name, the_plan.target_name, args.wait)
        elif result.changed:
            print(
                f"The controller in {the_plan.target_name!r} can now reach {the_plan.source_name!r}; check with: "
                f"kubemcsa status -n {api.SYSTEM_NAMESPACE} --context {target_info.context}"
            )
    finally:
        source_client.close()
        target_client.close()
    return EXIT_OK


def _run_federate(args: argparse.Namespace) -> int:
    from kubemcsa.cli import bootstrap, federate
    from kubemcsa.contract import federation

    source_info = config.context_cluster_info(args.source_context, args.source_kubeconfig)
    target_info = config.context_cluster_info(args.target_context, args.target_kubeconfig)
    target_name = args.target_name or target_info.cluster_name
    source_name = args.source_name or source_info.cluster_name
    bootstrap.check_cluster_name(target_name, "target", "--target-name")
    bootstrap.check_cluster_name(source_name, "source", "--source-name")
    servers = {"--source-server": args.source_server or source_info.server, "--target-server": args.target_server}
    for flag, url in servers.items():
        if url and not url.startswith("https://"):
            raise CommandError(f"{flag} {url!r} is not an https:// URL; give the API server's URL.")
    wanted = federation.FederatedSource(
        cluster_name=source_name,
        server=servers["--source-server"].rstrip("/"),
        ca_pem=source_info.ca_pem,
        audience=args.audiences[0] if args.audiences else source_name,
        audiences=tuple(args.audiences or ()),
        user_prefix=args.user_prefix if args.user_prefix is not None else federation.default_user_prefix(target_name),
    )
    target_client = config.context_config_and_namespace(target_info.context, args.target_kubeconfig).api_client()
    target = bootstrap.Cluster(
        "target", target_name, target_client, (args.target_server or target_info.server).rstrip("/"), target_info.ca_pem
    )
    try:
        if args.check:
            source = federate.recorded_source(target, source_name) or wanted
            result = federate.check(source, target)
            if not result.trusted:
                print(
                    f"Source cluster {source_name!r} does not trust target cluster {target_name!r} yet: "
                    f"{result.problem}. Run kubemcsa federate without --check and add the configuration it prints."
                )
                return EXIT_NOT_READY
            print(
                f"Source cluster {source_name!r} trusts target cluster {target_name!r}: a token of "
                f"{federate.CHECK_NAMESPACE}/{federate.CHECK_SERVICE_ACCOUNT} is user {result.username!r} there."
            )
            return EXIT_OK
        print(
            f"Federating target cluster {target_name!r} (context {target_info.context!r}) with source cluster "
            f"{source_name!r} (context {source_info.context!r})",
            flush=True,
        )
        if not args.no_discovery_binding:
            print(
                f"The ClusterRoleBinding {federation.DISCOVERY_BINDING_NAME} lets anyone read the OIDC discovery "
                f"document and public signing keys of {target_name!r}, as the source's API server must "
                "(--no-discovery-binding to serve them another way).",
                flush=True,
            )
        issuer, result = federate.apply(
            wanted, target, discovery_binding=not args.no_discovery_binding, report=lambda x: print(x, flush=True)
        )
        print(f"Target cluster {target_name!r} issues service-account tokens as {issuer.url}.")
        print(federate.instructions(issuer, target, wanted))
    finally:
        target_client.close()
    return EXIT_OK


def _wait_for_bootstrap_import(client: ApiClient, name: str, target: str, timeout: float) -> None:
    """Poll the bootstrap import until the controller reports it Ready; CommandError with its reason if not."""
    from kubemcsa.cli import status

    imports = kube.Resource(client, kube.SERVICE_ACCOUNT_IMPORTS)
    print(f"Waiting up to {timeout:g}s for the controller in {target!r} to report import {name} Ready...", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        row = status.import_status(imports.get(name, api.SYSTEM_NAMESPACE), dt.datetime.now(dt.UTC))
        if row.is_ready:
            print(f"Import {api.SYSTEM_NAMESPACE}/{name} is Ready: {row.message}")
            return
        if time.monotonic() > deadline:
            raise CommandError(
                f"the controller in target cluster {target!r} has not reported import {api.SYSTEM_NAMESPACE}/{name} "
                f"Ready within {timeout:g}s ({row.reason}: {row.message}); check that it is installed and running."
            )
        time.sleep(0.2)  # polling the import's status; a watch would need its own thread for a one-off wait


def _run_allow(args: argparse.Namespace) -> int:
    from kubemcsa.cli import allow

    targets = allow.parse_targets(args.to) if args.to else None
    info = config.context_cluster_info(args.context, args.kubeconfig)
    namespace = args.namespace or info.namespace
    if args.command == "allow":
        assert targets is not None  # --to is required

        def decide(sa: dict) -> allow.ExportPlan:
            return allow.plan_allow(sa, targets)
    else:

        def decide(sa: dict) -> allow.ExportPlan:
            return allow.plan_disallow(sa, targets)

    client = config.context_config_and_namespace(info.context, args.kubeconfig).api_client()
    try:
        report = lambda line: print(line, flush=True)  # noqa: E731
        plan = allow.apply(client, info.cluster_name, namespace, args.name, decide, report=report)
    finally:
        client.close()
    for asked, still in plan.still_allowed:
        print(f"Note: {asked} may still import it, as {still} still allows it; disallow {still} too if you mean it.")
    print(allow.summary(plan, info.cluster_name))
    if args.command == "disallow":
        print("Tokens already issued stay valid until they expire (spec.expirationSeconds of each import).")
    return EXIT_OK


def _run_export(args: argparse.Namespace) -> int:
    from kubemcsa.cli import export

    if args.export_name is not None and not api.is_dns_subdomain(args.export_name):
        raise CommandError(
            f"--as {args.export_name!r} is not a valid Secret name; use lowercase letters, digits and -."
        )
    try:
        seconds = export.parse_duration(args.duration) if args.duration else None
    except ValueError as exc:
        raise CommandError(f"--duration {exc}") from None
    manifest = export.export(
        args.name,
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        export_name=args.export_name,
        audiences=args.audiences,
        expiration_seconds=seconds,
        legacy=args.legacy,
    )
    sys.stdout.write(export.render_yaml(manifest))  # the intended output: the only place a token is printed
    return EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    from kubemcsa.cli import status

    context = config.context_config_and_namespace(args.context, args.kubeconfig)
    namespace = None if args.all_namespaces else (args.namespace or context.namespace)
    where = f"the cluster of context {args.context or 'current'!r} ({context.config.host})"
    client = context.api_client()
    try:
        imports = status.list_imports(client, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise CommandError(
                f"{where} does not serve ServiceAccountImports: install multicluster-service-account there first."
            ) from None
        if exc.status in (401, 403):
            raise CommandError(f"{where} refused to list ServiceAccountImports: use a context allowed to.") from None
        raise
    except (urllib3.exceptions.HTTPError, OSError):
        raise CommandError(f"cannot reach {where}; check the context and the network.") from None
    finally:
        client.close()
    statuses = status.rows(imports, dt.datetime.now(dt.UTC))
    if not statuses and namespace:
        print(f"No ServiceAccountImports found in namespace {namespace}.")
        return EXIT_OK
    sys.stdout.write(status.format_table(statuses, show_namespace=namespace is None))
    return EXIT_OK if all(s.is_ready for s in statuses) else EXIT_NOT_READY


def _run_demo(args: argparse.Namespace) -> int:
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


COMMANDS = {
    "bootstrap": _run_bootstrap,
    "federate": _run_federate,
    "allow": _run_allow,
    "disallow": _run_allow,
    "export": _run_export,
    "status": _run_status,
    "demo": _run_demo,
    "credentials": exec_plugin.run,
}


def _error_sentence(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"the API server refused the request: {kube.error_message(exc)}."
    problem = kube.local_file_problem(exc)
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
    from kubemcsa.cli.allow import AllowError
    from kubemcsa.cli.bootstrap import BootstrapError
    from kubemcsa.cli.export import ExportError
    from kubemcsa.cli.federate import FederateError

    try:
        return COMMANDS[args.command](args)
    except (
        CommandError,
        CredentialsError,
        BootstrapError,
        AllowError,
        ExportError,
        FederateError,
        ApiException,
        urllib3.exceptions.HTTPError,
    ) as exc:
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
