"""Read a ServiceAccountImport's spec, the one home of its field rules (pure: a dict in, data or a SpecError out).

Two readings of the same fields: `parse_spec`, strict, for the controller and the CLI (an invalid spec is an
error the import's condition reports); `federated_import`, lenient, for the admission webhook, which mounts what a
federated import's spec says or the defaults and never refuses a pod over a spec the controller will report.
Imports nothing but the contract's own modules: the webhook's serving workers read specs without the Kubernetes
client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubemcsa.contract import api
from kubemcsa.contract.argocd import ArgoCDCluster

TOKEN_TYPE_TOKEN_REQUEST = "TokenRequest"
TOKEN_TYPE_LEGACY = "Legacy"
# No token copied: the source trusts this cluster's tokens and pods call it with their own projected tokens.
TOKEN_TYPE_FEDERATED = "Federated"
TOKEN_TYPES = (TOKEN_TYPE_TOKEN_REQUEST, TOKEN_TYPE_LEGACY, TOKEN_TYPE_FEDERATED)
# A federated import's projected token lives as long as the kubelet's own default for projected tokens.
DEFAULT_FEDERATED_EXPIRATION_SECONDS = 3600
# kube-apiserver caps --service-account-max-token-expiration at no more than this in practice (2^32 s is absurd).
MAX_EXPIRATION_SECONDS = 2**32


class SpecError(ValueError):
    """The spec is invalid; the message names the field and says how to fix it."""


@dataclass(frozen=True)
class ImportSpec:
    """A validated ServiceAccountImport spec."""

    cluster_name: str
    namespace: str
    name: str
    audiences: tuple[str, ...] = ()
    expiration_seconds: int = api.DEFAULT_EXPIRATION_SECONDS
    token_type: str = TOKEN_TYPE_TOKEN_REQUEST
    argocd: ArgoCDCluster | None = None  # spec.argoCD: also keep an Argo CD cluster Secret

    @property
    def legacy(self) -> bool:
        return self.token_type == TOKEN_TYPE_LEGACY

    @property
    def federated(self) -> bool:
        return self.token_type == TOKEN_TYPE_FEDERATED

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that, when changed, call for a new token."""
        return {
            "clusterName": self.cluster_name,
            "namespace": self.namespace,
            "name": self.name,
            "audiences": list(self.audiences),
            "expirationSeconds": self.expiration_seconds,
            "tokenType": self.token_type,
        }


def _required_string(spec: dict[str, Any], field: str) -> str:
    value = spec.get(field)
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"spec.{field} is required and must be a non-empty string; set it and re-apply the import.")
    return value.strip()


def parse_spec(obj: Any) -> ImportSpec:
    """Validate the `spec` of an import object; raise SpecError with a one-sentence fix otherwise."""
    spec = obj.get("spec") if isinstance(obj, dict) else None
    if not isinstance(spec, dict):
        raise SpecError("spec is missing; set spec.clusterName, spec.namespace and spec.name.")
    cluster_name = _required_string(spec, "clusterName")
    namespace = _required_string(spec, "namespace")
    token_type = spec.get("tokenType", TOKEN_TYPE_TOKEN_REQUEST)
    if token_type is None:
        token_type = TOKEN_TYPE_TOKEN_REQUEST
    if token_type not in TOKEN_TYPES:
        raise SpecError(f"spec.tokenType {token_type!r} is unknown; use {', '.join(TOKEN_TYPES)}.")
    federated = token_type == TOKEN_TYPE_FEDERATED
    # A federated import calls the source as each pod's own service account: spec.name is not used.
    name = "" if federated else _required_string(spec, "name")
    if not api.is_dns_label(namespace):
        raise SpecError(f"spec.namespace {namespace!r} is not a valid namespace name (a lowercase RFC 1123 label).")
    if not federated and not api.is_dns_subdomain(name):
        raise SpecError(f"spec.name {name!r} is not a valid service account name (a lowercase RFC 1123 subdomain).")

    audiences = _audiences(spec, lenient=False)
    default_expiration = DEFAULT_FEDERATED_EXPIRATION_SECONDS if federated else api.DEFAULT_EXPIRATION_SECONDS
    expiration = _expiration(spec, default_expiration, lenient=False)

    if token_type == TOKEN_TYPE_LEGACY and audiences:
        raise SpecError("spec.audiences cannot be used with tokenType Legacy (legacy tokens have fixed audiences).")
    return ImportSpec(
        cluster_name=cluster_name,
        argocd=_parse_argocd(spec.get("argoCD"), cluster_name),
        namespace=namespace,
        name=name,
        audiences=audiences,
        expiration_seconds=expiration,
        token_type=token_type,
    )


def _audiences(spec: Mapping[str, Any], *, lenient: bool) -> tuple[str, ...]:
    """spec.audiences, stripped and distinct. Strict: a list of non-empty strings or nothing. Lenient: what is a
    non-empty string in a list, the rest ignored."""
    value = spec.get("audiences")
    if lenient:
        listed = value if isinstance(value, list) else ()
        strings = (a.strip() for a in listed if isinstance(a, str))
        return tuple(dict.fromkeys(a for a in strings if a))
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(a, str) and a.strip() for a in value):
        return tuple(dict.fromkeys(a.strip() for a in value))
    raise SpecError("spec.audiences must be a list of non-empty strings; fix or remove it.")


def _expiration(spec: Mapping[str, Any], default: int, *, lenient: bool) -> int:
    """spec.expirationSeconds, `default` when absent. Strict: an integer in range. Lenient: an integer of at least
    the minimum, else the default."""
    value = spec.get("expirationSeconds")
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if lenient:
        return value if is_integer and value >= api.MIN_EXPIRATION_SECONDS else default
    if value is None:
        return default
    if not is_integer:
        raise SpecError("spec.expirationSeconds must be an integer number of seconds; fix or remove it.")
    if value < api.MIN_EXPIRATION_SECONDS or value > MAX_EXPIRATION_SECONDS:
        raise SpecError(
            f"spec.expirationSeconds {value} is out of range; use at least {api.MIN_EXPIRATION_SECONDS} "
            f"(10 minutes) and at most {MAX_EXPIRATION_SECONDS}."
        )
    return value


@dataclass(frozen=True)
class FederatedImport:
    """What mounting a federated import takes beyond its Secret: its source, its spec.audiences (the pod's token
    carries the first), the token's lifetime."""

    cluster_name: str
    audiences: tuple[str, ...]
    expiration_seconds: int


def federated_import(obj: Any, *, max_audiences: int | None = None) -> FederatedImport | None:
    """The mount-relevant part of a federated import's spec (None for other imports), read leniently: the
    controller reports a bad spec; the webhook mounts what the spec says, or the defaults. At most
    `max_audiences` audiences are kept (the first ones)."""
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    if not isinstance(spec, Mapping) or spec.get("tokenType") != TOKEN_TYPE_FEDERATED:
        return None
    return FederatedImport(
        # Not stripped: compared as it is with the cluster names of the federated sources' records.
        cluster_name=str(spec.get("clusterName") or ""),
        audiences=_audiences(spec, lenient=True)[:max_audiences],
        expiration_seconds=_expiration(spec, DEFAULT_FEDERATED_EXPIRATION_SECONDS, lenient=True),
    )


def _parse_argocd(value: Any, cluster_name: str) -> ArgoCDCluster | None:
    """spec.argoCD, with its name defaulting to spec.clusterName; None when absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SpecError("spec.argoCD must be an object (for example {name: prod-eu}); fix or remove it.")
    name = value.get("name")
    if name is None:
        name = cluster_name
    elif not isinstance(name, str) or not name.strip():
        raise SpecError("spec.argoCD.name must be a non-empty string (or omitted for spec.clusterName); fix it.")
    project = value.get("project")
    if project is not None and (not isinstance(project, str) or not api.is_dns_subdomain(project)):
        raise SpecError(f"spec.argoCD.project {project!r} is not a valid Argo CD project name; fix or remove it.")
    raw_namespaces = value.get("namespaces")
    if raw_namespaces is None:
        namespaces: tuple[str, ...] = ()
    elif isinstance(raw_namespaces, list) and all(isinstance(n, str) and api.is_dns_label(n) for n in raw_namespaces):
        namespaces = tuple(dict.fromkeys(raw_namespaces))
    else:
        raise SpecError("spec.argoCD.namespaces must be a list of namespace names; fix or remove it.")
    cluster_resources = value.get("clusterResources")
    if cluster_resources is not None and not isinstance(cluster_resources, bool):
        raise SpecError("spec.argoCD.clusterResources must be true or false; fix or remove it.")
    if cluster_resources is not None and not namespaces:
        raise SpecError(
            "spec.argoCD.clusterResources only applies with spec.argoCD.namespaces (without them Argo CD manages "
            "cluster-scoped resources anyway); set namespaces or remove clusterResources."
        )
    return ArgoCDCluster(name=name.strip(), namespaces=namespaces, cluster_resources=cluster_resources, project=project)
