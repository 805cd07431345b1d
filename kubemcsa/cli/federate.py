"""`kubemcsa federate`: make a target cluster's service-account issuer trusted by a source cluster, as far as a
client can.

A client cannot change an API server's flags, so federate does the rest and prints the stanza the source's
administrator adds: it reads the target's issuer and discovery document, lets anyone read that public document
(unless told not to), records the federated source in the target's system namespace (a ConfigMap the controller
and the webhook watch) and prints the AuthenticationConfiguration. `--check` asks the source whether it already
trusts the target: a token of the target's trust-check service account (bound to nothing, so worth nothing in
the target) for the source's audience, sent to the source's SelfSubjectReview.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import urllib3
from kubernetes.client.exceptions import ApiException

from kubemcsa import config
from kubemcsa.cli.bootstrap_plan import check_cluster_name
from kubemcsa.cli.common import EXIT_NOT_READY, EXIT_OK, CommandError, add_cluster_pair_arguments, examples
from kubemcsa.client import kube, tokens
from kubemcsa.client import trust as trust_api
from kubemcsa.client.apply import Applier, Cluster, Result
from kubemcsa.contract import api, federation
from kubemcsa.contract.federation import FederatedSource, FederationError

# The service account whose token --check sends to the source: the controller's trust-check identity, which holds
# no RBAC in the target (apply creates it, as the manifests do), never one that may hold some (such as default).
CHECK_NAMESPACE = api.SYSTEM_NAMESPACE
CHECK_SERVICE_ACCOUNT = api.TRUST_CHECK_SERVICE_ACCOUNT
CHECK_TOKEN_SECONDS = 600
# Audiences a token valid in the target itself carries (kube-apiserver's --api-audiences defaults to the issuer).
TARGET_API_AUDIENCES = ("https://kubernetes.default.svc", "https://kubernetes.default.svc.cluster.local")


class FederateError(Exception):
    """Federate failed: one sentence naming the cluster and what to do. Never holds a token."""


@dataclass(frozen=True)
class Issuer:
    """The target cluster's service-account issuer, as its discovery document says."""

    url: str
    jwks_uri: str


def read_issuer(target: Cluster) -> Issuer:
    """The target's issuer, from its discovery document; FederateError if it serves none."""
    where = f"target cluster {target.name!r}"
    try:
        doc = kube.get_path(target.client, federation.DISCOVERY_PATH)
    except ApiException as exc:
        raise FederateError(
            f"{where} refused to serve its OIDC discovery document ({kube.error_message(exc)}); use a context "
            "with cluster-admin rights there."
        ) from None
    except (urllib3.exceptions.HTTPError, OSError):
        raise FederateError(f"cannot reach {where} at {target.server}; check the context and the network.") from None
    issuer, jwks_uri = doc.get("issuer"), doc.get("jwks_uri")
    if not isinstance(issuer, str) or not issuer.startswith("https://") or not isinstance(jwks_uri, str):
        raise FederateError(
            f"{where} serves no usable discovery document (issuer {issuer!r}); set its kube-apiserver's "
            "--service-account-issuer to an https URL and --service-account-jwks-uri to where others can fetch keys."
        )
    return Issuer(issuer, jwks_uri)


def apply(
    source: FederatedSource,
    target: Cluster,
    *,
    discovery_binding: bool = True,
    report: Callable[[str], None] = print,
) -> tuple[Issuer, Result]:
    """Read the target's issuer, bind discovery for anyone (unless told not to) and record the federated source
    in the target's system namespace; report each object."""
    try:
        federation.check_source(source)
    except FederationError as exc:
        raise FederateError(str(exc)) from None
    issuer = read_issuer(target)
    own = {issuer.url.rstrip("/"), *TARGET_API_AUDIENCES}
    for audience in source.allowed_audiences:
        if audience.rstrip("/") in own:
            raise FederateError(
                f"audience {audience!r} is an API audience of target cluster {target.name!r}: a token for it would "
                "be valid there too; choose another --audience (the default is the source cluster's name)."
            )
    result = Result()
    applier = Applier(target, result, report)
    if discovery_binding:
        applier.ensure(federation.discovery_binding())
    applier.ensure({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": api.SYSTEM_NAMESPACE}})
    applier.ensure(federation.trust_check_service_account())
    recorded = FederatedSource(**{**source.__dict__, "issuer": issuer.url})
    applier.ensure(federation.source_configmap(recorded, {"app.kubernetes.io/managed-by": "kubemcsa"}))
    return issuer, result


def recorded_source(target: Cluster, cluster_name: str) -> FederatedSource | None:
    """The federated source recorded in the target for `cluster_name`, if any."""
    configmaps = kube.Resource(target.client, kube.CONFIG_MAPS)
    try:
        obj = configmaps.get(federation.configmap_name(cluster_name), namespace=api.SYSTEM_NAMESPACE)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    try:
        return federation.source_from_configmap(obj)
    except FederationError as exc:
        raise FederateError(str(exc)) from None


def check(source: FederatedSource, target: Cluster) -> trust_api.TrustCheck:
    """Whether the source trusts the target now, with a short-lived token of the target's trust-check service
    account (never printed; it holds no RBAC in the target). Not trusted yet if that account does not exist yet."""
    where = f"target cluster {target.name!r}"
    try:
        issued = tokens.request_token(
            target.client,
            CHECK_NAMESPACE,
            CHECK_SERVICE_ACCOUNT,
            audiences=[source.audience],
            expiration_seconds=CHECK_TOKEN_SECONDS,
        )
    except ApiException as exc:
        if exc.status == 404:
            return trust_api.TrustCheck(
                None, f"{where} has no service account {CHECK_NAMESPACE}/{CHECK_SERVICE_ACCOUNT} to check with yet"
            )
        raise FederateError(
            f"cannot get a token of {CHECK_NAMESPACE}/{CHECK_SERVICE_ACCOUNT} from {where} to check with "
            f"({exc.status}: {' '.join(kube.error_message(exc).split())[:200]}); use a context with cluster-admin "
            "rights there."
        ) from None
    except (urllib3.exceptions.HTTPError, OSError, tokens.TokenAnswerError):
        raise FederateError(f"cannot get a token from {where} at {target.server} to check with.") from None
    return trust_api.check_trust(source, issued.token)


def instructions(issuer: Issuer, target: Cluster, source: FederatedSource) -> str:
    """What the source cluster's administrator adds, and the RBAC a federated user needs there."""
    config = federation.authentication_configuration(issuer.url, target.server, target.ca_pem, source)
    lines = [
        f"Add this to the --authentication-config file of the kube-apiserver of source cluster "
        f"{source.cluster_name!r} (it reloads the file by itself; merge the jwt entry if the file exists):",
        "",
        federation.render_authentication_configuration(config).rstrip("\n"),
        "",
    ]
    flags = federation.oidc_flags(issuer.url, target.server, source, f"/etc/kubernetes/{target.name}-ca.crt")
    if flags:
        lines += [
            "Or, on clusters that use the older flags (one issuer only), start kube-apiserver with the target's CA "
            "in that file and:",
            "  " + " ".join(flags),
            "",
        ]
    lines += [
        f"Pods of target cluster {target.name!r} will then be users named "
        f"{source.remote_user('<namespace>', '<service account>')!r} in {source.cluster_name!r}; grant them what "
        "they need there with RoleBindings, e.g.:",
        f"  kubectl --context <{source.cluster_name}> create rolebinding pod-lister --role=pod-lister "
        f"--user={source.remote_user('default', 'pod-lister')}",
        f"Then check with: kubemcsa federate --check --target-context <{target.name}> "
        f"--source-context <{source.cluster_name}>",
    ]
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------------------------


def register(commands: argparse._SubParsersAction, prog: str) -> None:
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
        epilog=examples(
            f"""
            {prog} federate --target-context cluster1 --source-context cluster2
            {prog} federate --target-context cluster1 --source-context cluster2 --check
            {prog} federate --target-context c1 --source-context c2 --audience c2.example --user-prefix c1:
            """
        ),
    )
    add_cluster_pair_arguments(fed)
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
    fed.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:

    source_info = config.context_cluster_info(args.source_context, args.source_kubeconfig)
    target_info = config.context_cluster_info(args.target_context, args.target_kubeconfig)
    target_name = args.target_name or target_info.cluster_name
    source_name = args.source_name or source_info.cluster_name
    check_cluster_name(target_name, "target", "--target-name")
    check_cluster_name(source_name, "source", "--source-name")
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
    target = Cluster(
        "target", target_name, target_client, (args.target_server or target_info.server).rstrip("/"), target_info.ca_pem
    )
    try:
        if args.check:
            source = recorded_source(target, source_name) or wanted
            result = check(source, target)
            if not result.trusted:
                print(
                    f"Source cluster {source_name!r} does not trust target cluster {target_name!r} yet: "
                    f"{result.problem}. Run kubemcsa federate without --check and add the configuration it prints."
                )
                return EXIT_NOT_READY
            print(
                f"Source cluster {source_name!r} trusts target cluster {target_name!r}: a token of "
                f"{CHECK_NAMESPACE}/{CHECK_SERVICE_ACCOUNT} is user {result.username!r} there."
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
        issuer, result = apply(
            wanted, target, discovery_binding=not args.no_discovery_binding, report=lambda x: print(x, flush=True)
        )
        print(f"Target cluster {target_name!r} issues service-account tokens as {issuer.url}.")
        print(instructions(issuer, target, wanted))
    finally:
        target_client.close()
    return EXIT_OK
