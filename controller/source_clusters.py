"""A source cluster as the controller holds it (where it is, the CA that proves it, how to build its client, whose
credential), and how one is read from each origin: a kubeconfig context, a mounted import, a credential Secret.
controller/sources.py keeps the registry of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiClient

from controller.model import Remote
from kubemcsa.client import connect
from kubemcsa.client.kubeconfig import (
    ConfigError,
    absolutize,
    api_client_for,
    resolve_context,
)
from kubemcsa.client.tokens import consumer_of_token, unverified_claims
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, CredentialsError
from kubemcsa.contract.imports import is_controlled_by, metadata_of, string_map

ORIGIN_KUBECONFIG = "source kubeconfig"


ORIGIN_MOUNTED = "mounted import"


ORIGIN_SECRET = "system namespace Secret"


_ORDER = (ORIGIN_KUBECONFIG, ORIGIN_MOUNTED, ORIGIN_SECRET)


@dataclass(frozen=True)
class SourceCluster:
    """One source cluster: where it is, the CA that proves it, and how to build a client for it."""

    name: str
    origin: str
    server: str
    ca_pem: bytes = field(repr=False)
    fingerprint: str  # changes whenever the credentials change
    build: Callable[[], ApiClient] = field(repr=False, compare=False)
    credential_expires_at: float | None = None  # when the controller's own credential for it expires, if known
    consumer: str | None = None  # this cluster's name in the source, which exports name; None: unknown

    @property
    def remote(self) -> Remote:
        return Remote(
            cluster_name=self.name,
            server=self.server,
            ca_pem=self.ca_pem,
            origin=self.origin,
            credential_expires_at=self.credential_expires_at,
        )


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (None if it is not one): when a credential stops working."""
    exp = unverified_claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def client_error_message(source: SourceCluster, exc: Exception) -> str:
    """Why no client could be built for `source`, in one sentence for the import's condition (never a secret).

    A failure of the controller's own filesystem says so: the configuration it came from is not to blame.
    """
    where = f"The controller cannot build a client for cluster {source.name}"
    if isinstance(exc, CredentialsError):
        return f"{where} from its {source.origin}: {exc}"
    problem = connect.local_file_problem(exc)
    if problem:
        return (
            f"{where}: its local filesystem refused ({problem}), which is no fault of the {source.origin}; "
            "give the controller's pod a writable /tmp (an emptyDir) or report it."
        )
    return f"{where} from its {source.origin} ({type(exc).__name__}); fix that configuration."


def source_from_credentials(
    name: str, origin: str, creds: Credentials, expires_at: float | None = None, cluster_name: str | None = None
) -> SourceCluster:
    """The source `creds` reach; its consumer name is the one its token says (bootstrap's), else `cluster_name`."""
    return SourceCluster(
        name=name,
        origin=origin,
        server=creds.server,
        ca_pem=creds.ca_crt,
        fingerprint=_fingerprint(creds.server, creds.ca_crt.decode(errors="replace"), creds.token),
        build=lambda: connect.client_for_credentials(creds),
        credential_expires_at=expires_at if expires_at is not None else token_expiry(creds.token),
        consumer=consumer_of_token(creds.token) or cluster_name,
    )


def is_source_credential(secret: dict[str, Any], import_obj: dict[str, Any] | None, system_namespace: str) -> bool:
    """True if `secret` is the Secret of import `import_obj` of the system namespace, controlled by it (by UID):
    the only Secrets the controller takes as source credentials are those it (or bootstrap, for it) made."""
    meta = metadata_of(secret)
    name = string_map(meta.get("labels")).get(api.IMPORT_LABEL)
    imp = metadata_of(import_obj)
    return bool(
        name
        and meta.get("namespace") == system_namespace
        and meta.get("name") == api.secret_name_for_import(name)
        and imp.get("namespace") == system_namespace
        and imp.get("name") == name
        and imp.get("uid")
        and not imp.get("deletionTimestamp")
        and is_controlled_by(secret, imp["uid"])
    )


def sources_from_kubeconfig(
    config: dict[str, Any], base_dir: str, cluster_name: str | None = None
) -> tuple[dict[str, SourceCluster], dict[str, str]]:
    """Source clusters named after the contexts of a kubeconfig dict, and errors for contexts that are unusable.

    Read by kubemcsa.client.kubeconfig, as every kubeconfig of the project: paths relative to `base_dir`, the CA kept in
    memory, a tokenFile followed when it rotates.
    """
    config = absolutize(config, base_dir)
    sources: dict[str, SourceCluster] = {}
    errors: dict[str, str] = {}
    for ctx in config.get("contexts") or []:
        if not isinstance(ctx, dict) or not isinstance(ctx.get("name"), str):
            continue
        name = ctx["name"]
        try:
            context = resolve_context(config, name, where="the source kubeconfig")
        except ConfigError as exc:
            errors[name] = f"context {name} of the source kubeconfig is unusable: {exc}"
            continue
        if not context.server.startswith("https://"):
            errors[name] = f"context {name} of the source kubeconfig has no https:// server; fix it."
            continue
        sources[name] = SourceCluster(
            name=name,
            origin=ORIGIN_KUBECONFIG,
            server=context.server,
            ca_pem=context.ca_pem,
            # Files the context refers to (a rotated tokenFile, renewed client certificates) count as credentials.
            fingerprint=_fingerprint(context.cluster, context.user, _stat_signature(context.files())),
            build=lambda context=context: api_client_for(context),
            consumer=cluster_name or consumer_of_token(str(context.user.get("token") or "")),
        )
    return sources, errors


def keep_missing_once(
    before: dict[str, SourceCluster],
    read: dict[str, SourceCluster],
    errors: dict[str, str],
    missing_before: set[str],
) -> tuple[dict[str, SourceCluster], dict[str, str], set[str]]:
    """The sources and errors to install after a read of a kubeconfig, and the contexts it lost for the first time.

    A context that a read loses (gone, or unusable now) is kept as it was until a second read in a row says so
    too: a file rewritten in place reads short for a moment, and its imports must not flap UnknownCluster.
    """
    lost = {name for name in before if name not in read}
    first_time = lost - missing_before
    kept, kept_errors = dict(read), dict(errors)
    for name in first_time:
        kept[name] = before[name]
        kept_errors.pop(name, None)
    return kept, kept_errors, first_time


# A file changed less than this long ago may be in the middle of a write (a writer paused between two writes).
SETTLE_SECONDS = 1.0


def _just_written(path: str) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < SETTLE_SECONDS
    except OSError:
        return False


def _stat_signature(paths: list[str]) -> tuple[Any, ...]:
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
            signature.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            signature.append((path, None))
    return tuple(signature)
