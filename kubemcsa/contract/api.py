"""The names every part of multicluster-service-account agrees on.

The user-facing contract of the original Go implementation (group, kind, annotation, label, mount path,
Secret keys) lives here, together with the pure functions that derive names from an import's name, so
that the controller (which creates Secrets) and the webhook (which mounts them, possibly before they
exist) can never disagree.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

GROUP = "multicluster.admiralty.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ServiceAccountImport"
PLURAL = "serviceaccountimports"
SINGULAR = "serviceaccountimport"
SHORT_NAME = "sai"
CRD_NAME = f"{PLURAL}.{GROUP}"

# On pods (and pod templates): comma-separated import names to mount.
IMPORT_ANNOTATION = "multicluster.admiralty.io/service-account-import.name"
# On the Secrets the controller maintains: the name of the import that owns it (same key, as the original).
IMPORT_LABEL = IMPORT_ANNOTATION
# On namespaces whose pods may ask for imports.
NAMESPACE_LABEL = "multicluster-service-account"
NAMESPACE_LABEL_VALUE = "enabled"

MOUNT_ROOT = "/var/run/secrets/admiralty.io/serviceaccountimports"
SYSTEM_NAMESPACE = "multicluster-service-account"
# The identity whose tokens check a federated source's trust (manifests/controller/serviceaccount.yaml): it is
# bound to nothing, so a check token is worth nothing in this cluster, only at the source's authentication.
TRUST_CHECK_SERVICE_ACCOUNT = "multicluster-service-account-trust-check"
# The webhook's serving certificate lives in a namespace of its own: whoever may write Secrets where source
# credentials live (the system namespace) can point the controller at another server, so only the controller
# and admins may; the webhook and the certificate job write their one Secret here instead.
CERT_NAMESPACE = "multicluster-service-account-certs"
# The most imports one pod may ask for: a pod has no use for more, and it bounds the webhook's work per request.
MAX_IMPORTS_PER_POD = 32

# Export, on a ServiceAccount of a source cluster, set by its owner (`kubemcsa allow`): the label makes it visible
# to consumer controllers (their watch selects it), the annotation says which consumer cluster/namespace pairs
# may import it, e.g. "cluster1/team-a, cluster1/ci-*" (kubemcsa/contract/export_policy.py reads it).
EXPORTED_LABEL = "multicluster.admiralty.io/exported"
EXPORTED_LABEL_VALUE = "true"
EXPORTED_SELECTOR = f"{EXPORTED_LABEL}={EXPORTED_LABEL_VALUE}"
EXPORT_TO_ANNOTATION = "multicluster.admiralty.io/export-to"

# The keys of an import's Secret (and of `kubemcsa export`'s output).
KEY_CA_CRT = "ca.crt"
KEY_NAMESPACE = "namespace"
KEY_TOKEN = "token"
KEY_SERVER = "server"
KEY_CONFIG = "config"
SECRET_KEYS = (KEY_CA_CRT, KEY_NAMESPACE, KEY_TOKEN, KEY_SERVER, KEY_CONFIG)
# A federated import's Secret: no token (the pod's own projected token is mounted beside these as `token`).
FEDERATED_SECRET_KEYS = (KEY_CA_CRT, KEY_NAMESPACE, KEY_SERVER, KEY_CONFIG)

# Condition types and reasons on a ServiceAccountImport's status.
CONDITION_READY = "Ready"
REASON_TOKEN_ISSUED = "TokenIssued"
REASON_UNKNOWN_CLUSTER = "UnknownCluster"
REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND = "RemoteServiceAccountNotFound"
REASON_FORBIDDEN = "Forbidden"
REASON_UNAUTHORIZED = "Unauthorized"
REASON_REMOTE_UNREACHABLE = "RemoteUnreachable"
REASON_SECRET_CONFLICT = "SecretNameConflict"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_REMOTE_ERROR = "RemoteError"
REASON_TOKEN_EXPIRED = "TokenExpired"
# Federated imports: Ready when the source trusts this cluster's tokens, FederationNotTrusted until it does.
REASON_FEDERATED = "Federated"
REASON_FEDERATION_NOT_TRUSTED = "FederationNotTrusted"
# A federated import asks for a token audience that the admin's record of its source does not allow.
REASON_AUDIENCE_NOT_ALLOWED = "AudienceNotAllowed"
REASON_NOT_EXPORTED = "NotExported"
# The controller's own credential for the source cluster expired: every import of that cluster says so.
REASON_SOURCE_CREDENTIAL_EXPIRED = "SourceCredentialExpired"
# The source's certificate is not signed by the CA the controller holds for it.
REASON_REMOTE_CERTIFICATE_UNTRUSTED = "RemoteCertificateUntrusted"
# On a system-namespace import (Event): its Secret matches no pin its writer recorded, so it is no credential.
REASON_UNTRUSTED_CREDENTIAL = "UntrustedCredential"
# The source answered a token whose subject is not the service account asked for: it is not used.
REASON_TOKEN_SUBJECT_MISMATCH = "TokenSubjectMismatch"

DEFAULT_EXPIRATION_SECONDS = 86400
MIN_EXPIRATION_SECONDS = 600
# Refresh a token once this fraction of its lifetime has passed (the kubelet does the same for projected tokens).
REFRESH_FRACTION = 0.8

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_MAX_LABEL = 63
_MAX_SUBDOMAIN = 253
_SECRET_SUFFIX = "-token"
_ARGOCD_SECRET_SUFFIX = "-argocd"
_VOLUME_PREFIX = "sai-"


def is_dns_label(value: str) -> bool:
    """True if `value` is an RFC 1123 label (names of volumes, namespaces, ...)."""
    return len(value) <= _MAX_LABEL and bool(_DNS_LABEL.match(value))


def is_dns_subdomain(value: str) -> bool:
    """True if `value` is an RFC 1123 subdomain (names of most objects, ServiceAccountImports included)."""
    return len(value) <= _MAX_SUBDOMAIN and bool(_DNS_SUBDOMAIN.match(value))


def _short_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def _suffixed_name(import_name: str, suffix: str) -> str:
    """`<import><suffix>`, cut and disambiguated with a hash of the full name if too long for an object name."""
    name = import_name + suffix
    if len(name) <= _MAX_SUBDOMAIN:
        return name
    head = import_name[: _MAX_SUBDOMAIN - len(suffix) - 9].rstrip(".-")
    return f"{head}-{_short_hash(import_name)}{suffix}"


def secret_name_for_import(import_name: str) -> str:
    """The name of the Secret the controller keeps for an import: `<import>-token`.

    Deterministic so that the webhook can mount it before the controller has created it. A name too long
    to take the suffix is cut and disambiguated with a hash of the full name.
    """
    return _suffixed_name(import_name, _SECRET_SUFFIX)


def argocd_secret_name_for_import(import_name: str) -> str:
    """The name of the Argo CD cluster Secret the controller keeps for an import with spec.argoCD: `<import>-argocd`."""
    return _suffixed_name(import_name, _ARGOCD_SECRET_SUFFIX)


def import_name_for_argocd_secret(secret_name: str) -> str | None:
    """The import whose Argo CD Secret would be named `secret_name` (None if no import's would, or if the name was
    cut short, which only the import itself can tell)."""
    if not secret_name.endswith(_ARGOCD_SECRET_SUFFIX):
        return None
    import_name = secret_name[: -len(_ARGOCD_SECRET_SUFFIX)]
    return import_name if import_name and argocd_secret_name_for_import(import_name) == secret_name else None


def volume_name_for_import(import_name: str) -> str:
    """The pod volume name for an import: `sai-<import>` when that is a DNS label, else `sai--<head>-<hash>`.

    The two forms never meet: a DNS label cannot start with "-", so no import name gives `sai--...` in the
    first form. In the second, `<head>` is the import name made a label and cut, `<hash>` a short hash of the
    full name; see volume_names_for_imports for the names of a whole pod, which are distinct by construction.
    """
    name = _VOLUME_PREFIX + import_name
    if is_dns_label(name):
        return name
    cleaned = re.sub(r"[^a-z0-9-]", "-", import_name.lower())
    # Room for "-" + hash, and for the "-NN" that volume_names_for_imports may add.
    head = (_VOLUME_PREFIX + "-" + cleaned)[: _MAX_LABEL - 9 - 3].rstrip("-")
    return f"{head}-{_short_hash(import_name)}"


def volume_names_for_imports(import_names: Sequence[str]) -> list[str]:
    """The volume names of a pod's imports (distinct names in, distinct DNS labels out, in the same order).

    Each is volume_name_for_import's, except when two hashed names collide (two names with the same head and
    the same short hash): the later one gets its position as a suffix, `-<index>`. A hashed name ends with 8 hex
    digits and a suffixed one with "-" and at most two digits (MAX_IMPORTS_PER_POD), so they never meet either.
    """
    names: list[str] = []
    seen: set[str] = set()
    for index, import_name in enumerate(import_names):
        name = volume_name_for_import(import_name)
        if name in seen:
            name = f"{name}-{index}"
        seen.add(name)
        names.append(name)
    return names


def mount_path_for_import(import_name: str) -> str:
    """Where an import's Secret is mounted in every container of an annotated pod."""
    return f"{MOUNT_ROOT}/{import_name}"


def consumer_service_account(consumer_cluster: str) -> str:
    """The name of a consumer cluster's account in a source cluster's system namespace (bootstrap makes it)."""
    return consumer_cluster


def service_account_username(namespace: str, name: str) -> str:
    """How Kubernetes names a service account as a user (and a token's `sub`): system:serviceaccount:NS:NAME."""
    return f"system:serviceaccount:{namespace}:{name}"


def consumer_username(consumer_cluster: str) -> str:
    """The user a consumer cluster's controller is in a source cluster, as RBAC and 403 messages name it."""
    return service_account_username(SYSTEM_NAMESPACE, consumer_service_account(consumer_cluster))


def parse_import_annotation(value: str | None, limit: int | None = None) -> list[str]:
    """The import names in a pod's annotation, in order, without blanks or repeats.

    `" a, ,b,a "` gives `["a", "b"]`: whitespace and empty items are tolerated, as users write lists by hand.
    Linear in the length of the value. With `limit`, stops after `limit + 1` names: enough to tell that there
    are too many, without reading on.
    """
    if not value:
        return []
    names: dict[str, None] = {}  # ordered, with O(1) membership
    start = 0
    while start <= len(value):
        end = value.find(",", start)
        if end < 0:
            end = len(value)
        name = value[start:end].strip()
        start = end + 1
        if name and name not in names:
            names[name] = None
            if limit is not None and len(names) > limit:
                break
    return list(names)


def namespace_enabled(labels: dict[str, str] | None) -> bool:
    """True if a namespace with these labels lets its pods ask for imports."""
    return (labels or {}).get(NAMESPACE_LABEL) == NAMESPACE_LABEL_VALUE


# The ClusterProfile extension's fields (controller/outputs/clusterprofile.py writes them).
EXT_SECRET_NAME = "secretName"
EXT_NAMESPACE = "namespace"
EXT_TOKEN_FILE = "tokenFile"
