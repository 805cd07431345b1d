"""The Secret of a ServiceAccountImport: its data, labels, annotations and ownerReference, built in one place.

Used by the controller (every import), by `kubemcsa bootstrap` (the first Secret of the controller's own
import) and by the tests, so a Secret written by any of them is one the controller recognises as current and
adopts without a new token request. The annotations record when the token was issued, when it expires, what
it was issued for (a hash of the spec and the source's server and CA) and a hash of the data (so an edit
shows in the cache alone). Pure functions only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kubemcsa.contract import api
from kubemcsa.contract.credentials import (
    Credentials,
    CredentialsError,
    federated_secret_data,
    from_secret_data,
    to_secret_data,
)
from kubemcsa.contract.spec import ImportSpec
from kubemcsa.contract.timefmt import format_time, parse_time

ANNOTATION_PREFIX = "multicluster.admiralty.io/"
ANNOTATION_EXPIRES = ANNOTATION_PREFIX + "token-expiration"
ANNOTATION_ISSUED = ANNOTATION_PREFIX + "token-issued"
ANNOTATION_INPUTS_HASH = ANNOTATION_PREFIX + "inputs-hash"
ANNOTATION_DATA_HASH = ANNOTATION_PREFIX + "data-hash"
_OURS = (ANNOTATION_EXPIRES, ANNOTATION_ISSUED, ANNOTATION_INPUTS_HASH, ANNOTATION_DATA_HASH)


@dataclass(frozen=True, slots=True)  # slots: held in memory for every import
class IssuedToken:
    """A token as an API server issued it: when, and until when (None: a legacy token that never expires)."""

    token: str = field(repr=False)
    issued_at: float
    expires_at: float | None
    ca_pem: bytes | None = field(default=None, repr=False)  # legacy only: the CA the token Secret carries

    @property
    def expiration_timestamp(self) -> str | None:
        return None if self.expires_at is None else format_time(self.expires_at)

    @property
    def refresh_at(self) -> float | None:
        return refresh_time(self.issued_at, self.expires_at)


def refresh_time(issued_at: float, expires_at: float | None) -> float | None:
    """When to replace a token: after REFRESH_FRACTION of its real lifetime; None for a token that never expires."""
    if expires_at is None:
        return None
    return issued_at + api.REFRESH_FRACTION * max(0.0, expires_at - issued_at)


@dataclass(frozen=True, slots=True)
class ImportToken:
    """A token held for an import: the credentials it makes, when it was issued, and what it was issued for."""

    credentials: Credentials
    issued: IssuedToken
    inputs_hash: str

    @property
    def refresh_at(self) -> float | None:
        return self.issued.refresh_at

    @property
    def expires_at(self) -> float | None:
        return self.issued.expires_at


def as_dict(value: Any) -> dict[str, Any]:
    """`value` if it is a mapping, else {}: objects edited by hand may hold anything."""
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def metadata_of(obj: Any) -> dict[str, Any]:
    return as_dict(as_dict(obj).get("metadata"))


@functools.lru_cache(maxsize=256)  # asked twice a pass (assess, then the token's record), mostly of a few accounts
def inputs_hash(spec: ImportSpec, server: str, ca_pem: bytes, remote_uid: str | None = None) -> str:
    """A hash of everything a token depends on: the spec, the source's server and CA, and the UID of the exported
    service account (a service account deleted and re-created under the same name is another one)."""
    material = dict(spec.fingerprint_fields())
    material["server"] = server
    material["ca"] = hashlib.sha256(ca_pem).hexdigest()
    if remote_uid:
        material["uid"] = remote_uid
    return hashlib.sha256(_SORTED_JSON.encode(material).encode()).hexdigest()[:16]


# What inputs_hash hashes must never change (a changed hash is a new token for every import): json.dumps with
# sort_keys, by one encoder rather than one built per call.
_SORTED_JSON = json.JSONEncoder(sort_keys=True)


def data_hash(data: dict[str, Any] | None, length: int = 16) -> str:
    """A hash of a Secret's data, recorded in an annotation so that an edit can be told from the cache alone
    (16 hex digits); the whole SHA-256 (`length=64`) pins a source credential."""
    data = as_dict(data)
    material = "".join(f"{key}\0{data[key]}\0" for key in sorted(data)).encode()  # UTF-8: as each part encoded alone
    return hashlib.sha256(material).hexdigest()[:length]


# --- the import Secret as the controller's cache holds it ------------------------------------------------------
# Each import Secret's `config` is a kubeconfig holding the token inline: most of what its cache entry would hold,
# and nothing the controller reads back (every Secret it writes is built from credentials). The cache keeps the
# key with an empty value (key checks still hold), the token decoded once (the very string the controller's memory
# of the token then shares) and the hash of the full data, computed as the object enters the cache, under
# top-level fields. The API server drops unknown fields of a Secret, and the cache form sets or drops those fields
# whatever the object held, so no writer can forge them. Readers of a cached Secret use `secret_credentials`,
# `secret_token` and `secret_data_hash`, which read either form.
CACHED_DATA_HASH = "kubemcsa.cachedDataHash"
CACHED_TOKEN = "kubemcsa.cachedToken"


def cache_form_of_secret(secret: dict[str, Any], system_namespace: str) -> dict[str, Any]:
    """`secret` as the controller's Secret cache keeps it: an import Secret slimmed as said above; anything else
    (a source credential of the system namespace, whose pin hashes the full data; an output's Secret) whole."""
    secret.pop(CACHED_DATA_HASH, None)
    secret.pop(CACHED_TOKEN, None)
    meta = metadata_of(secret)
    data = secret.get("data")
    import_name = string_map(meta.get("labels")).get(api.IMPORT_LABEL)
    if (
        not isinstance(data, dict)
        or meta.get("namespace") == system_namespace
        or import_name is None
        or meta.get("name") != api.secret_name_for_import(import_name)
    ):
        return secret
    secret[CACHED_DATA_HASH] = data_hash(data)
    # Nor what nobody reads of it (every Secret written is built anew): five top-level keys, a smaller dict each.
    secret.pop("apiVersion", None)
    secret.pop("kind", None)
    meta.pop("creationTimestamp", None)
    slim = dict(data)
    if api.KEY_CONFIG in slim:
        slim[api.KEY_CONFIG] = ""
    token = _decoded_text(data.get(api.KEY_TOKEN))
    if token:
        secret[CACHED_TOKEN] = token
        slim[api.KEY_TOKEN] = ""
    secret["data"] = slim
    # The import's own reference (and a stale one of its name): only who it is and that it controls are read,
    # and a write replaces it whole. Others' references are kept whole: a write keeps them as they are.
    refs = meta.get("ownerReferences")
    if isinstance(refs, list):
        meta["ownerReferences"] = [
            {key: ref[key] for key in _OWN_REFERENCE_KEYS if key in ref}
            if isinstance(ref, dict) and ref.get("kind") == api.KIND and ref.get("name") == import_name
            else ref
            for ref in refs
        ]
    return secret


_OWN_REFERENCE_KEYS = ("kind", "name", "uid", "controller")  # what is_controlled_by and controlled_secret read


def cache_form_of_import(imp: dict[str, Any]) -> dict[str, Any]:
    """`imp` as the controller's import cache keeps it: without its creationTimestamp, which nothing reads (and
    which takes its metadata past five keys, the size at which a dict doubles)."""
    metadata = imp.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("creationTimestamp", None)
    return imp


def secret_data_hash(secret: dict[str, Any]) -> str:
    """The hash of a Secret's data (as its data-hash annotation should record it), as the cache saw it whole."""
    cached = secret.get(CACHED_DATA_HASH)
    return cached if isinstance(cached, str) else data_hash(as_dict(secret.get("data")))


def secret_token(secret: dict[str, Any] | None) -> str | None:
    """The token an import Secret holds, decoded (None: none, or not base64 UTF-8 text)."""
    cached = as_dict(secret).get(CACHED_TOKEN)
    return cached if isinstance(cached, str) else _decoded_text(as_dict(as_dict(secret).get("data")).get(api.KEY_TOKEN))


def secret_credentials(secret: dict[str, Any] | None, *, require_token: bool = True) -> Credentials:
    """The credentials an import Secret holds, whole or in the cache's form; raise CredentialsError if unreadable."""
    cached = as_dict(secret).get(CACHED_TOKEN)
    data = as_dict(as_dict(secret).get("data"))
    return from_secret_data(
        data, require_token=require_token, decoded_token=cached if isinstance(cached, str) else None
    )


def _decoded_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


# --- source credentials: pinned in the import's status by whoever wrote them -----------------------------------
# A Secret of the system namespace is a source credential: whoever could write one under an import's name could
# point the controller, and every import of that source, at a server of their choosing. So its writer (the
# controller when it rotates it, `kubemcsa bootstrap` as an admin) first records the Secret's UID and the SHA-256 of
# its data in the import's status, which only the controller and admins may write (the status subresource), and
# the controller uses no credential that matches no pin. The pin of the Secret being replaced stays until the
# write lands, so a crash between the two writes loses nothing.
STATUS_PINS = "sourceCredentialPins"
PIN_UID = "secretUID"
PIN_DIGEST = "dataSHA256"


def credential_pins(imp: dict[str, Any] | None) -> list[dict[str, str]]:
    """The pins recorded in the import's status (well-formed entries only)."""
    pins = as_list(as_dict(as_dict(imp).get("status")).get(STATUS_PINS))
    return [
        {PIN_UID: str(p.get(PIN_UID) or ""), PIN_DIGEST: p[PIN_DIGEST]}
        for p in pins
        if isinstance(p, dict) and isinstance(p.get(PIN_DIGEST), str) and p[PIN_DIGEST]
    ]


def credential_pin(secret: dict[str, Any], uid: str | None = None) -> dict[str, str]:
    """The pin of a Secret: its UID (`uid` if given; empty for one not created yet) and the SHA-256 of its data."""
    secret_uid = uid if uid is not None else str(metadata_of(secret).get("uid") or "")
    return {PIN_UID: secret_uid, PIN_DIGEST: data_hash(as_dict(secret).get("data"), 64)}


def is_pinned(secret: dict[str, Any] | None, imp: dict[str, Any] | None) -> bool:
    """True if the import's status pins this very Secret with these very data (a pin without a UID was recorded
    just before the Secret was created: its data alone must match)."""
    if secret is None:
        return False
    mine = credential_pin(secret)
    return any(
        pin[PIN_DIGEST] == mine[PIN_DIGEST] and pin[PIN_UID] in ("", mine[PIN_UID]) for pin in credential_pins(imp)
    )


def pins_for_write(imp: dict[str, Any], existing: dict[str, Any] | None, body: dict[str, Any]) -> list[dict[str, str]]:
    """The pins to record before writing `body` over `existing` (None: creating it): the existing Secret's, if it
    is pinned, so that it stays good until the write lands, then that of `body` (the UID it will keep)."""
    pins = [credential_pin(existing)] if existing is not None and is_pinned(existing, imp) else []
    uid = str(metadata_of(existing).get("uid") or "") if existing is not None else ""
    new = credential_pin(body, uid)
    return [*pins, new] if new not in pins else pins


def pins_patch(imp: dict[str, Any], pins: list[dict[str, str]]) -> dict[str, Any]:
    """A merge patch of the import's status recording `pins`, refused (409) if the import changed since it was
    read: two writers (the controller, bootstrap) never overwrite each other's pins unseen."""
    return {"metadata": {"resourceVersion": metadata_of(imp).get("resourceVersion")}, "status": {STATUS_PINS: pins}}


def owner_reference(imp: dict[str, Any]) -> dict[str, Any]:
    """A controller ownerReference to the import, so deleting the import deletes the Secret."""
    meta = metadata_of(imp)
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "name": meta.get("name", ""),
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def is_controlled_by(obj: dict[str, Any] | None, owner_uid: str) -> bool:
    for ref in as_list(metadata_of(obj).get("ownerReferences")):
        if isinstance(ref, dict) and ref.get("controller") is True and ref.get("uid") == owner_uid:
            return True
    return False


def string_map(value: Any) -> dict[str, str]:
    """The string entries of a labels or annotations map (objects edited by hand may hold anything)."""
    return {k: v for k, v in as_dict(value).items() if isinstance(v, str)}


def controlled_secret(
    imp: dict[str, Any],
    name: str,
    data: dict[str, str],
    labels: dict[str, str],
    annotations: dict[str, str],
    existing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Secret `name` in the import's namespace, controlled by the import, built on `existing` (keeping its
    resourceVersion, type and others' ownerReferences). Every Secret the controller keeps for an import is one."""
    meta = metadata_of(imp)
    old_meta = metadata_of(existing)
    others = [
        ref
        for ref in as_list(old_meta.get("ownerReferences"))
        if isinstance(ref, dict)
        and ref.get("uid") != meta.get("uid")
        and (ref.get("kind"), ref.get("name")) != (api.KIND, meta.get("name"))
    ]
    new_meta: dict[str, Any] = {
        "name": name,
        # Always the import's own namespace: whoever may create an import there may already write Secrets there.
        "namespace": meta.get("namespace"),
        "labels": labels,
        "annotations": annotations,
        "ownerReferences": [owner_reference(imp), *others],
    }
    if old_meta.get("resourceVersion"):
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": new_meta,
        "type": as_dict(existing).get("type") or "Opaque",
        "data": data,
    }


def import_secret(
    imp: dict[str, Any], token: ImportToken, cluster_name: str, existing: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The Secret holding `token` for import `imp`, built on `existing` (keeping its version and others' keys)."""
    annotations = {ANNOTATION_ISSUED: format_time(token.issued.issued_at)}
    if token.expires_at is not None:
        annotations[ANNOTATION_EXPIRES] = format_time(token.expires_at)
    annotations[ANNOTATION_INPUTS_HASH] = token.inputs_hash
    return _secret(imp, to_secret_data(token.credentials, cluster_name), annotations, existing)


def federated_import_secret(
    imp: dict[str, Any],
    server: str,
    ca_pem: bytes,
    namespace: str,
    cluster_name: str,
    inputs: str,
    existing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Secret of a federated import: `ca.crt`, `namespace`, `server` and a `config` reading `tokenFile: token`,
    and no token (the pod's projected token is mounted beside them)."""
    data = federated_secret_data(server, ca_pem, namespace, cluster_name)
    return _secret(imp, data, {ANNOTATION_INPUTS_HASH: inputs}, existing)


def federated_secret_is_current(secret: dict[str, Any], wanted_inputs: str) -> bool:
    """True if the Secret is an unedited federated Secret for these inputs (four keys, no token)."""
    annotations = as_dict(metadata_of(secret).get("annotations"))
    data = as_dict(secret.get("data"))
    return (
        annotations.get(ANNOTATION_INPUTS_HASH) == wanted_inputs
        and annotations.get(ANNOTATION_DATA_HASH) == secret_data_hash(secret)
        and set(data) == set(api.FEDERATED_SECRET_KEYS)
    )


def _secret(
    imp: dict[str, Any], data: dict[str, str], ours: dict[str, str], existing: dict[str, Any] | None
) -> dict[str, Any]:
    """The import's Secret with `data` and our annotations `ours`, keeping others' labels and annotations."""
    meta = metadata_of(imp)
    old_meta = metadata_of(existing)
    labels = string_map(old_meta.get("labels"))
    labels[api.IMPORT_LABEL] = meta["name"]
    annotations = {k: v for k, v in string_map(old_meta.get("annotations")).items() if k not in _OURS}
    annotations.update(ours)
    annotations[ANNOTATION_DATA_HASH] = data_hash(data)
    return controlled_secret(imp, api.secret_name_for_import(meta["name"]), data, labels, annotations, existing)


def without_token(imp: dict[str, Any], existing: dict[str, Any]) -> dict[str, Any] | None:
    """The import's Secret without its token (and without `config`, which holds it inline), or None if it holds
    none already: what is left when the source no longer exports the service account."""
    data = {k: v for k, v in as_dict(existing.get("data")).items() if k not in (api.KEY_TOKEN, api.KEY_CONFIG)}
    if data == as_dict(existing.get("data")):
        return None
    old_meta = metadata_of(existing)
    annotations = {k: v for k, v in string_map(old_meta.get("annotations")).items() if k not in _OURS}
    name = api.secret_name_for_import(metadata_of(imp).get("name", ""))
    return controlled_secret(imp, name, data, string_map(old_meta.get("labels")), annotations, existing)


def token_times(secret: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """(issued at, expires at) as the Secret's annotations record them."""
    annotations = as_dict(metadata_of(secret).get("annotations"))
    return parse_time(annotations.get(ANNOTATION_ISSUED)), parse_time(annotations.get(ANNOTATION_EXPIRES))


def token_from_secret(secret: dict[str, Any]) -> ImportToken | None:
    """The token a Secret holds (so a restarted controller needs no token request), None if unreadable."""
    issued_at, expires_at = token_times(secret)
    if issued_at is None:
        return None
    try:
        creds = secret_credentials(secret)
    except CredentialsError:
        return None
    inputs = as_dict(metadata_of(secret).get("annotations")).get(ANNOTATION_INPUTS_HASH, "")
    return ImportToken(creds, IssuedToken(creds.token, issued_at, expires_at), str(inputs))


def secret_is_current(secret: dict[str, Any], wanted_inputs: str, now: float) -> bool:
    """True if the Secret holds an unedited token, issued for these inputs, that is not due for refresh."""
    annotations = as_dict(metadata_of(secret).get("annotations"))
    data = as_dict(secret.get("data"))
    if annotations.get(ANNOTATION_INPUTS_HASH) != wanted_inputs:
        return False
    if annotations.get(ANNOTATION_DATA_HASH) != secret_data_hash(secret) or any(k not in data for k in api.SECRET_KEYS):
        return False
    issued_at, expires_at = token_times(secret)
    if issued_at is None:
        return False
    refresh_at = IssuedToken("", issued_at, expires_at).refresh_at
    return refresh_at is None or now < refresh_at


def share_token(cached_secret: dict[str, Any], token: str) -> dict[str, Any]:
    """`cached_secret` (in the cache's form) holding `token`, the very string held in memory, if that is the token
    it holds: the cache form decodes its own copy from the Secret written (a kilobyte per import)."""
    if cached_secret.get(CACHED_TOKEN) == token:
        cached_secret[CACHED_TOKEN] = token
    return cached_secret


def share_ca(token: ImportToken, cas: dict[bytes, bytes]) -> ImportToken:
    """`token` holding the one copy of its CA that every token of its source holds (`cas`: CA -> that copy, kept
    by the caller): each token read back from a Secret otherwise holds its own copy of the same bytes."""
    ca = token.credentials.ca_crt
    shared = cas.get(ca)
    if shared is None:
        if len(cas) >= 256:  # CAs of sources: a handful; a bound all the same
            cas.clear()
        shared = cas[ca] = ca
    if shared is ca:
        return token
    return dataclasses.replace(token, credentials=dataclasses.replace(token.credentials, ca_crt=shared))
