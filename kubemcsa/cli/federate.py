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

from collections.abc import Callable
from dataclasses import dataclass

import urllib3
from kubernetes.client.exceptions import ApiException

from kubemcsa.cli.bootstrap import Applier, Cluster, Result
from kubemcsa.client import kube, tokens
from kubemcsa.client import trust as trust_api
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
