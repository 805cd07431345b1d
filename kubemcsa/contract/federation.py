"""Federated source clusters: a source cluster that trusts this cluster's own service-account tokens (OIDC).

In the federated trust mode no token is copied anywhere: the source cluster's API server is configured (by its
administrator, with `--authentication-config`) to authenticate JWTs issued by this cluster, and a pod calls it with
its own projected, kubelet-rotated token. This module holds what every part agrees on, as pure functions:
- the ConfigMap that records a federated source in the system namespace (`kubemcsa federate` writes it, the
  controller and the webhook read it): server, CA, the audiences a token sent there may carry, and user-name
  prefix, no secret. Only this record (an admin's) says which audiences those are, never an import: a token for
  another audience could be worth something elsewhere (`audience_refusal`);
- the AuthenticationConfiguration stanza and `--oidc-*` flags the source's administrator adds;
- the user name the source cluster sees for a pod's service account;
The edge (whether the source accepts a token of this cluster, and as whom) is kubemcsa.client.trust.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from kubemcsa.contract import api

JSON = dict[str, Any]

# On the ConfigMaps of the system namespace that describe federated source clusters.
FEDERATED_SOURCE_LABEL = "multicluster.admiralty.io/federated-source"
FEDERATED_SOURCE_LABEL_VALUE = "true"
KEY_CLUSTER_NAME = "clusterName"
KEY_SERVER = "server"
KEY_CA_CRT = "ca.crt"
KEY_AUDIENCE = "audience"  # the default audience (of imports without spec.audiences, and of the trust check)
# Optional: every audience imports of the source may ask for, comma-separated (the default is always one of them).
# Records without it (older ones) allow the default audience only.
KEY_AUDIENCES = "audiences"
MAX_AUDIENCES = 16
KEY_USER_PREFIX = "userPrefix"
KEY_ISSUER = "issuer"
_CONFIGMAP_PREFIX = "federated-"

# The ClusterRole kube ships for reading the OIDC discovery document and keys, and our binding of it for anyone.
DISCOVERY_CLUSTER_ROLE = "system:service-account-issuer-discovery"
DISCOVERY_BINDING_NAME = "multicluster-service-account:anonymous-issuer-discovery"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
DISCOVERY_PATH = "/.well-known/openid-configuration"
AUTHENTICATION_CONFIGURATION_API_VERSION = "apiserver.config.k8s.io/v1beta1"
SERVICE_ACCOUNT_USERNAME_PREFIX = "system:serviceaccount:"
# In status.remoteUser, where the pod's service account goes.
REMOTE_USER_PLACEHOLDER = "<service-account>"


class FederationError(ValueError):
    """A federated source is described wrongly; the message says which field and what to do (never a secret)."""


@dataclass(frozen=True)
class FederatedSource:
    """A source cluster that trusts this cluster's service-account tokens, as `kubemcsa federate` recorded it."""

    cluster_name: str
    server: str
    ca_pem: bytes
    audience: str
    user_prefix: str
    issuer: str = ""
    audiences: tuple[str, ...] = ()  # the other audiences the source accepts, besides `audience`

    @property
    def allowed_audiences(self) -> tuple[str, ...]:
        """The audiences a token sent to this source may carry: the default first, then the others recorded."""
        return tuple(dict.fromkeys((self.audience, *self.audiences)))

    def remote_user(self, namespace: str, service_account: str) -> str:
        """The user name the source's API server sees for a token of this cluster's `namespace/service_account`."""
        return remote_user(self.user_prefix, namespace, service_account)


def remote_user(prefix: str, namespace: str, service_account: str) -> str:
    return f"{prefix}{SERVICE_ACCOUNT_USERNAME_PREFIX}{namespace}:{service_account}"


_AUDIENCE_SEPARATORS = re.compile(r"[,\s]+")


def split_audiences(text: str) -> tuple[str, ...]:
    """The audiences of a record's `audiences` value (comma- or blank-separated), in order, without repeats."""
    return tuple(dict.fromkeys(a for a in _AUDIENCE_SEPARATORS.split(text) if a))


def record_audiences(data: Mapping[str, object]) -> tuple[str, ...]:
    """The audiences a record allows, the default first, read leniently (the webhook's view: the controller reads
    the record strictly and reports a broken one); () without a usable default audience."""
    default = data.get(KEY_AUDIENCE)
    if not isinstance(default, str) or not default.strip():
        return ()
    others = data.get(KEY_AUDIENCES)
    listed = split_audiences(others) if isinstance(others, str) else ()
    return tuple(dict.fromkeys((default.strip(), *listed)))[:MAX_AUDIENCES]


def _shown(audience: str) -> str:
    """An audience as a message shows it: printable, and short (an import's spec chooses it)."""
    text = "".join(c if c.isprintable() else "?" for c in audience[:64])
    return text + ("..." if len(audience) > 64 else "")


def audience_refusal(cluster_name: str, requested: Sequence[str], allowed: Sequence[str]) -> str | None:
    """Why an import of federated source `cluster_name` may not ask for the audiences `requested` (its
    spec.audiences), or None if the admin's record allows them all. The trust check and the pod's token carry
    them to the source, so only the record may choose them: an import choosing this cluster's own API audience, or
    another source's, would have a token sent there that is worth something elsewhere."""
    refused = [a for a in requested if a not in allowed]
    if not refused or not allowed:
        return None
    shown = ", ".join(_shown(a) for a in refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
    flags = " ".join(f"--audience {_shown(a)}" for a in (*allowed, *refused[:3]))
    return (
        f"The record of federated cluster {cluster_name} allows the audience{'s' if len(allowed) > 1 else ''} "
        f"{', '.join(_shown(a) for a in allowed)} only, not {shown} of spec.audiences; remove spec.audiences to use "
        f"{_shown(allowed[0])}, or ask a cluster admin to run kubemcsa federate --source-context <{cluster_name}> "
        f"{flags} and add the printed configuration to that cluster."
    )


def configmap_name(cluster_name: str) -> str:
    """The name of the ConfigMap recording federated source `cluster_name` (hashed when too long)."""
    name = _CONFIGMAP_PREFIX + cluster_name
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(cluster_name.encode()).hexdigest()[:8]
    return f"{name[:244].rstrip('.-')}-{digest}"


def default_user_prefix(target_name: str) -> str:
    return f"{target_name}:"


def check_source(source: FederatedSource) -> None:
    """FederationError unless `source` can be recorded and used."""
    if not api.is_dns_subdomain(source.cluster_name):
        raise FederationError(f"the source cluster name {source.cluster_name!r} is not a valid Kubernetes name.")
    if not source.server.startswith("https://"):
        raise FederationError(f"federated source {source.cluster_name!r} has a server that is not an https:// URL.")
    if b"-----BEGIN CERTIFICATE-----" not in source.ca_pem:
        raise FederationError(f"federated source {source.cluster_name!r} has a CA that is not a PEM certificate.")
    if not source.audience or any(c.isspace() for c in source.audience):
        raise FederationError(f"federated source {source.cluster_name!r} needs an audience without spaces.")
    for audience in source.audiences:
        if not audience or any(c.isspace() or c == "," for c in audience):
            raise FederationError(
                f"federated source {source.cluster_name!r} has an audience that is empty or holds a space or comma."
            )
    if len(source.allowed_audiences) > MAX_AUDIENCES:
        raise FederationError(f"federated source {source.cluster_name!r} allows more than {MAX_AUDIENCES} audiences.")
    if any(c.isspace() for c in source.user_prefix):
        raise FederationError(f"federated source {source.cluster_name!r} has a user-name prefix with spaces.")
    if source.user_prefix.startswith("system:") or source.user_prefix == "":
        # Without a prefix of our own, a pod could be taken for one of the source's own service accounts.
        raise FederationError(
            f"federated source {source.cluster_name!r} needs a user-name prefix that does not start with system: "
            "(the default is this cluster's name and a colon)."
        )


def source_configmap(source: FederatedSource, labels: dict[str, str] | None = None) -> JSON:
    """The ConfigMap, in the system namespace, that records a federated source (it holds nothing secret)."""
    check_source(source)
    data = {
        KEY_CLUSTER_NAME: source.cluster_name,
        KEY_SERVER: source.server,
        KEY_CA_CRT: source.ca_pem.decode(),
        KEY_AUDIENCE: source.audience,
        KEY_USER_PREFIX: source.user_prefix,
    }
    if len(source.allowed_audiences) > 1:
        data[KEY_AUDIENCES] = ",".join(source.allowed_audiences)
    if source.issuer:
        data[KEY_ISSUER] = source.issuer
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(source.cluster_name),
            "namespace": api.SYSTEM_NAMESPACE,
            "labels": {**(labels or {}), FEDERATED_SOURCE_LABEL: FEDERATED_SOURCE_LABEL_VALUE},
        },
        "data": data,
    }


def source_from_configmap(obj: JSON) -> FederatedSource:
    """Read a federated source back from its ConfigMap; FederationError naming what is wrong."""
    meta = obj.get("metadata") or {}
    data = obj.get("data") or {}
    where = f"ConfigMap {meta.get('namespace', '')}/{meta.get('name', '')}"
    missing = [k for k in (KEY_CLUSTER_NAME, KEY_SERVER, KEY_CA_CRT, KEY_AUDIENCE, KEY_USER_PREFIX) if k not in data]
    if missing:
        raise FederationError(f"{where} lacks {', '.join(missing)}; run kubemcsa federate again.")
    values = {k: v for k, v in data.items() if isinstance(v, str)}
    source = FederatedSource(
        cluster_name=values.get(KEY_CLUSTER_NAME, "").strip(),
        server=values.get(KEY_SERVER, "").strip().rstrip("/"),
        ca_pem=values.get(KEY_CA_CRT, "").encode(),
        audience=values.get(KEY_AUDIENCE, "").strip(),
        user_prefix=values.get(KEY_USER_PREFIX, ""),
        issuer=values.get(KEY_ISSUER, "").strip(),
        audiences=split_audiences(values.get(KEY_AUDIENCES, "")),
    )
    try:
        check_source(source)
    except FederationError as exc:
        raise FederationError(f"{where}: {exc} Run kubemcsa federate again.") from None
    return source


def is_source_configmap(obj: JSON) -> bool:
    meta = obj.get("metadata") or {}
    return (meta.get("labels") or {}).get(FEDERATED_SOURCE_LABEL) == FEDERATED_SOURCE_LABEL_VALUE


def trust_check_service_account(namespace: str = api.SYSTEM_NAMESPACE) -> JSON:
    """The identity whose tokens check a source's trust (the controller's and `federate --check`'s): bound to
    nothing, so a token of it is worth nothing in this cluster; no pod runs as it (as in manifests/controller)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": api.TRUST_CHECK_SERVICE_ACCOUNT,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": api.TRUST_CHECK_SERVICE_ACCOUNT},
        },
        "automountServiceAccountToken": False,
    }


def discovery_binding() -> JSON:
    """The ClusterRoleBinding that lets anyone, the source cluster's API server included, read this cluster's
    OIDC discovery document and public signing keys: kube ships the ClusterRole but not this binding."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": DISCOVERY_BINDING_NAME, "labels": {"app.kubernetes.io/managed-by": "kubemcsa"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": DISCOVERY_CLUSTER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": UNAUTHENTICATED_GROUP}],
    }


def discovery_url(issuer: str, target_server: str) -> str | None:
    """Where the source fetches the discovery document, when not at the issuer URL itself (None then)."""
    url = target_server.rstrip("/") + DISCOVERY_PATH
    return None if issuer.rstrip("/") == target_server.rstrip("/") else url


def authentication_configuration(
    issuer: str, target_server: str, target_ca_pem: bytes, source: FederatedSource
) -> JSON:
    """The AuthenticationConfiguration (for the source's `--authentication-config`) that trusts this cluster."""
    issuer_stanza: JSON = {"url": issuer}
    found_at = discovery_url(issuer, target_server)
    if found_at:
        issuer_stanza["discoveryURL"] = found_at
    issuer_stanza["audiences"] = list(source.allowed_audiences)
    if len(source.allowed_audiences) > 1:  # kube-apiserver requires it with more than one audience
        issuer_stanza["audienceMatchPolicy"] = "MatchAny"
    issuer_stanza["certificateAuthority"] = target_ca_pem.decode()
    return {
        "apiVersion": AUTHENTICATION_CONFIGURATION_API_VERSION,
        "kind": "AuthenticationConfiguration",
        "jwt": [
            {
                "issuer": issuer_stanza,
                "claimMappings": {"username": {"claim": "sub", "prefix": source.user_prefix}},
            }
        ],
    }


def render_authentication_configuration(config: JSON) -> str:
    """YAML as an administrator pastes it, the CA as a readable block."""

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False)


def oidc_flags(issuer: str, target_server: str, source: FederatedSource, ca_file: str) -> list[str] | None:
    """The older `--oidc-*` flags with the same effect, or None where they do not suffice (they have no
    discovery URL: the source must fetch the document at the issuer URL itself; and one audience only)."""
    if discovery_url(issuer, target_server) or len(source.allowed_audiences) > 1:
        return None
    return [
        f"--oidc-issuer-url={issuer}",
        f"--oidc-client-id={source.audience}",
        "--oidc-username-claim=sub",
        f"--oidc-username-prefix={source.user_prefix}",
        f"--oidc-ca-file={ca_file}",
    ]


def projected_volume(volume_name: str, secret_name: str, audience: str, expiration_seconds: int) -> JSON:
    """The pod volume of a federated import: the Secret's four keys and the pod's own service-account token for
    the source's audience, as the files `ca.crt`, `namespace`, `server`, `config` and `token` (which the kubelet
    rotates), the same five files a TokenRequest import's Secret gives."""
    items = [{"key": key, "path": key} for key in api.FEDERATED_SECRET_KEYS]
    token = {"path": api.KEY_TOKEN, "audience": audience, "expirationSeconds": expiration_seconds}
    return {
        "name": volume_name,
        "projected": {"sources": [{"secret": {"name": secret_name, "items": items}}, {"serviceAccountToken": token}]},
    }
