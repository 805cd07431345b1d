"""Decide how to mutate a pod being created: which import Secrets to mount, or why to refuse it.

Pure logic: the pod, its namespace and a lookup in, a `Decision` out. The lookup is the only thing that may
reach the outside world (the webhook's watch-fed cache), and only once the pod has asked for imports.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubemcsa import api, federation

# Refusal reasons: the label of the refusals metric, and a stable word for tests and logs.
REASON_IMPORT_NOT_FOUND = "ImportNotFound"
REASON_INVALID_IMPORT_NAME = "InvalidImportName"
REASON_VOLUME_CONFLICT = "VolumeConflict"
REASON_MOUNT_CONFLICT = "MountConflict"
REASON_INVALID_POD = "InvalidPod"
REASON_LOOKUP_FAILED = "LookupFailed"
REASON_TOO_MANY_IMPORTS = "TooManyImports"
REASON_TOO_MANY_CONTAINERS = "TooManyContainers"
REASON_UNKNOWN_FEDERATED_SOURCE = "UnknownFederatedSource"
# A federated import's spec.audiences holds one its source's record does not allow (as the import's condition says).
REASON_AUDIENCE_NOT_ALLOWED = api.REASON_AUDIENCE_NOT_ALLOWED
REASON_SECRET_NOT_CONTROLLED = "SecretNotControlled"

# The most containers (init, regular and ephemeral together) the webhook mounts imports into: with the import cap,
# it bounds the patch (and the work) to MAX_CONTAINERS * MAX_IMPORTS_PER_POD mounts.
MAX_CONTAINERS = 256

_CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True)
class ProjectedToken:
    """How a federated import is mounted: the pod's own token for this audience and lifetime."""

    audience: str
    expiration_seconds: int


@dataclass(frozen=True)
class FederatedRefusal:
    """Why a federated import cannot be mounted: its source is not recorded, or its audience is not allowed."""

    reason: str
    message: str


class ImportLookup(Protocol):
    """What the decision needs to know about the cluster (implemented by the webhook's cache)."""

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        """The labels of a namespace, or None if it does not exist."""
        ...

    def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
        """Those of `names` (at most MAX_IMPORTS_PER_POD) that are not ServiceAccountImports in this namespace."""
        ...

    def federated_imports(
        self, namespace: str, names: Sequence[str]
    ) -> Mapping[str, ProjectedToken | FederatedRefusal]:
        """Those of `names` (all existing) that are federated: their projected token, or why it cannot be mounted
        (their source is not on record, or its record does not allow their audience). Asked after
        missing_imports, from what it already knows."""
        ...

    def unowned_secrets(self, namespace: str, names: Sequence[str]) -> Mapping[str, str]:
        """Those of `names` (all existing) whose `<name>-token` Secret is someone else's, as the controller says
        on the import: why it is not mounted. Asked after missing_imports, from what it already knows."""
        ...


class LookupFailed(Exception):
    """The lookup could not tell (API unreachable); the message says so without any secret."""


class TooMuchWork(Exception):
    """prepare() was asked to stay small and the pod needs more mounts than that: prepare it elsewhere."""


class LookupWouldBlock(Exception):
    """A cache-only lookup missed: the caller should retry the decision off the event loop with API fallback."""


@dataclass(frozen=True)
class Decision:
    """Allow (with RFC 6902 operations, possibly none) or refuse (with a reason and a message for the user)."""

    allowed: bool
    reason: str = ""
    message: str = ""
    # The operations as compact JSON, assembled from cached fragments: what the answer carries (hot path).
    patch_json: str = "[]"

    @property
    def patch(self) -> list[dict[str, Any]]:
        """The operations as data."""
        return json.loads(self.patch_json)


ALLOW = Decision(allowed=True)


def refuse(reason: str, message: str) -> Decision:
    return Decision(allowed=False, reason=reason, message=message)


def requested_imports(pod: Mapping[str, Any]) -> list[str] | None:
    """The import names the pod asks for ([] if none), or None if its metadata is malformed.

    At most MAX_IMPORTS_PER_POD + 1 names: one more than allowed is enough to refuse the pod.
    """
    metadata = pod.get("metadata")
    if metadata is None:
        return []
    if not isinstance(metadata, Mapping):
        return None
    annotations = metadata.get("annotations")
    if annotations is None:
        return []
    if not isinstance(annotations, Mapping):
        return None
    value = annotations.get(api.IMPORT_ANNOTATION)
    if value is None:
        return []
    if not isinstance(value, str):
        return None
    return api.parse_import_annotation(value, limit=api.MAX_IMPORTS_PER_POD)


_SHOWN_NAME_LENGTH = 80


def _quoted(names: Sequence[str]) -> str:
    # A name in a message is cut: the annotation may hold a megabyte-long "name".
    return ", ".join(
        f'"{name[:_SHOWN_NAME_LENGTH]}…"' if len(name) > _SHOWN_NAME_LENGTH else f'"{name}"' for name in names
    )


def _shown(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(name[: _SHOWN_NAME_LENGTH + 1] for name in names)


@dataclass(frozen=True)
class Prepared:
    """All the decision needs from a pod, worked out without the cluster: small (bounded by the import cap),
    picklable, so that a large pod can be prepared in another process (see webhook.review)."""

    # The answer when there is nothing to look up: no annotation, or a malformed pod.
    early: Decision | None
    # The requested imports (at most MAX_IMPORTS_PER_POD + 1), and those of them that are not valid names.
    names: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()
    # The patch (or a conflict refusal) to answer once every import is known to exist.
    planned: Decision | None = None


def prepare(pod: Any, *, max_mounts: int | None = None) -> Prepared:
    """The lookup-free part of the decision: linear in the size of the pod, whatever it holds.

    With `max_mounts`, raises TooMuchWork rather than plan more mounts (imports x containers) than that.
    """
    if not isinstance(pod, Mapping):
        return Prepared(
            refuse(REASON_INVALID_POD, "The request's object is not a pod; only pods can be admitted by this webhook.")
        )
    names = requested_imports(pod)
    if names is None:
        return Prepared(
            refuse(
                REASON_INVALID_POD,
                f"The pod's metadata.annotations is malformed; set {api.IMPORT_ANNOTATION} to a comma-separated "
                "string.",
            )
        )
    if not names:
        return Prepared(ALLOW)
    if len(names) > api.MAX_IMPORTS_PER_POD:
        return Prepared(None, tuple(names))
    invalid = [name for name in names if not api.is_dns_subdomain(name)]
    if invalid:
        # Only the start of a name is ever shown: the rest is not kept (nor sent back from a worker process).
        return Prepared(None, _shown(names), _shown(invalid))
    if max_mounts is not None and len(names) * _containers_count(pod.get("spec")) > max_mounts:
        raise TooMuchWork
    return Prepared(None, tuple(names), planned=plan_patch(pod, names))


def _containers_count(spec: Any) -> int:
    if not isinstance(spec, Mapping):
        return 0
    return sum(len(c) for f in _CONTAINER_FIELDS if isinstance(c := spec.get(f), list))


def finish(prepared: Prepared, namespace: str, lookup: ImportLookup) -> Decision:
    """The decision for a prepared pod created in `namespace`: at most one namespace and one import lookup."""
    if prepared.early is not None:
        return prepared.early
    if not (isinstance(namespace, str) and api.is_dns_label(namespace)):
        return refuse(
            REASON_INVALID_POD, "The pod's namespace is not a valid namespace name; create it in a namespace."
        )
    if not api.namespace_enabled(lookup.namespace_labels(namespace)):
        return ALLOW
    if len(prepared.names) > api.MAX_IMPORTS_PER_POD:
        return refuse(
            REASON_TOO_MANY_IMPORTS,
            f"{api.IMPORT_ANNOTATION} names more than {api.MAX_IMPORTS_PER_POD} imports, the most a pod may ask "
            "for; name only the imports this pod uses.",
        )
    if prepared.invalid:
        invalid = prepared.invalid
        return refuse(
            REASON_INVALID_IMPORT_NAME,
            f"{api.IMPORT_ANNOTATION} names {_quoted(invalid)}, which {'is' if len(invalid) == 1 else 'are'} not a "
            "valid ServiceAccountImport name; use lowercase names of ServiceAccountImports, separated by commas.",
        )
    missing = lookup.missing_imports(namespace, prepared.names)
    if missing:
        plural = len(missing) > 1
        return refuse(
            REASON_IMPORT_NOT_FOUND,
            f"ServiceAccountImport{'s' if plural else ''} {_quoted(missing)} "
            f'{"do" if plural else "does"} not exist in namespace "{namespace}"; create '
            f"{'them' if plural else 'it'} there first (kubectl get serviceaccountimports -n {namespace}) "
            f"or fix the pod's {api.IMPORT_ANNOTATION} annotation.",
        )
    assert prepared.planned is not None
    unowned = lookup.unowned_secrets(namespace, prepared.names)
    if unowned:
        # Someone else's Secret under the import's name: mounting it would hand the pod what they put there.
        return refuse(REASON_SECRET_NOT_CONTROLLED, " ".join(unowned.values()))
    federated = lookup.federated_imports(namespace, prepared.names)
    if not federated:
        return prepared.planned
    refusals = [why for why in federated.values() if isinstance(why, FederatedRefusal)]
    if refusals:
        return refuse(refusals[0].reason, " ".join(r.message for r in refusals))
    return with_projected_tokens(prepared.planned, prepared.names, federated)  # type: ignore[arg-type]


def with_projected_tokens(planned: Decision, names: Sequence[str], federated: Mapping[str, ProjectedToken]) -> Decision:
    """The planned patch with each federated import's Secret volume replaced by its projected volume (the Secret's
    four keys and the pod's own token): the same path, the same five files."""
    if not planned.allowed:
        return planned
    patch_json = planned.patch_json
    for item in _mounts_for(names):
        token = federated.get(item.name)
        if token is None:
            continue
        volume = federation.projected_volume(
            item.volume_name, item.secret_name, token.audience, token.expiration_seconds
        )
        patch_json = patch_json.replace(item.volume_json, _compact(volume))
    return Decision(allowed=True, patch_json=patch_json)


def decide(pod: Any, namespace: str, lookup: ImportLookup) -> Decision:
    """Decide what to do with a pod created in `namespace`: finish(prepare(pod), namespace, lookup).

    No annotation, or a namespace that is not enabled: allowed untouched (even if the API server's
    namespaceSelector is misconfigured). Otherwise the pod may ask for at most MAX_IMPORTS_PER_POD imports,
    every one must exist in the namespace, and the pod gets one volume per import (its Secret; for a federated
    import, a projected volume of the Secret's four keys and the pod's own token) and one read-only
    mount per import in every container (of at most MAX_CONTAINERS); what is already there (reinvocation) is
    not added again, and what collides with the pod's own volumes or mounts is refused. May raise LookupFailed.
    """
    return finish(prepare(pod), namespace, lookup)


@dataclass(frozen=True)
class _Mounted:
    """One import as the pod gets it: its volume, Secret and mount path, and their JSON fragments."""

    name: str
    volume_name: str
    secret_name: str
    mount_path: str
    volume_json: str
    mount_json: str


@functools.lru_cache(maxsize=4096)
def _mounted(name: str, volume_name: str) -> _Mounted:
    # Pure, and the same few imports come back all day: names derived and JSON serialized once, not per request.
    secret_name, mount_path = api.secret_name_for_import(name), api.mount_path_for_import(name)
    volume = {"name": volume_name, "secret": {"secretName": secret_name}}
    mount = {"name": volume_name, "mountPath": mount_path, "readOnly": True}
    return _Mounted(name, volume_name, secret_name, mount_path, _compact(volume), _compact(mount))


_volume_name = functools.lru_cache(maxsize=4096)(api.volume_name_for_import)


def _mounts_for(names: Sequence[str]) -> list[_Mounted]:
    volume_names = [_volume_name(name) for name in names]
    if len(set(volume_names)) != len(volume_names):  # two hashed names collided: let api disambiguate
        volume_names = api.volume_names_for_imports(names)
    return [_mounted(name, volume_name) for name, volume_name in zip(names, volume_names, strict=True)]


_compact = json.JSONEncoder(separators=(",", ":")).encode


def _is_import_volume(volume: Mapping[str, Any], secret_name: str) -> bool:
    """True if a volume of the pod already is the import's (reinvocation): its Secret volume, or the projected
    volume of a federated import, whose first source is that Secret."""
    secret = volume.get("secret")
    if isinstance(secret, Mapping):
        return secret.get("secretName") == secret_name
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, Mapping) else None
    first = sources[0] if isinstance(sources, list) and sources and isinstance(sources[0], Mapping) else {}
    return isinstance(first.get("secret"), Mapping) and first["secret"].get("name") == secret_name


def _add(path: str, value_json: str) -> str:
    # Paths are built here from field names and indexes: nothing to escape.
    return f'{{"op":"add","path":"{path}","value":{value_json}}}'


def _normalized_path(path: str) -> str:
    return path.rstrip("/") or "/"


def plan_patch(pod: Mapping[str, Any], names: Sequence[str]) -> Decision:
    """The RFC 6902 operations that mount these imports into the pod, or a refusal if they collide."""
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return refuse(REASON_INVALID_POD, "The pod has no valid spec; it must be an object with containers.")
    containers_count = _containers_count(spec)
    if containers_count > MAX_CONTAINERS:
        return refuse(
            REASON_TOO_MANY_CONTAINERS,
            f"The pod has {containers_count} containers; the webhook mounts imports into pods of at most "
            f"{MAX_CONTAINERS} containers (init and ephemeral ones included).",
        )
    mounted = _mounts_for(names)
    operations: list[str] = []  # each one compact JSON

    volumes = spec.get("volumes")
    if volumes is not None and not isinstance(volumes, list):
        return refuse(REASON_INVALID_POD, "The pod's spec.volumes is malformed; it must be a list.")
    # Only string names can collide with ours; anything else is the API server's validation to reject.
    existing_volumes = {
        v["name"]: v for v in volumes or () if isinstance(v, Mapping) and isinstance(v.get("name"), str)
    }
    new_volumes = []
    for item in mounted:
        existing = existing_volumes.get(item.volume_name)
        if existing is None:
            new_volumes.append(item.volume_json)
            continue
        if not _is_import_volume(existing, item.secret_name):
            return refuse(
                REASON_VOLUME_CONFLICT,
                f'The pod already has a volume named "{item.volume_name}" that is not the Secret of '
                f'ServiceAccountImport "{item.name}"; rename that volume, the name is reserved for the import.',
            )
    if new_volumes:
        if volumes is None:
            operations.append(_add("/spec/volumes", f"[{','.join(new_volumes)}]"))
        else:
            operations.extend(_add("/spec/volumes/-", v) for v in new_volumes)

    for field_name in _CONTAINER_FIELDS:
        containers = spec.get(field_name)
        if containers is None:
            continue
        if not isinstance(containers, list):
            return refuse(REASON_INVALID_POD, f"The pod's spec.{field_name} is malformed; it must be a list.")
        for index, container in enumerate(containers):
            if not isinstance(container, Mapping):
                return refuse(REASON_INVALID_POD, f"The pod's spec.{field_name}[{index}] is malformed.")
            mounts = container.get("volumeMounts")
            if mounts is not None and not isinstance(mounts, list):
                return refuse(
                    REASON_INVALID_POD,
                    f"The pod's spec.{field_name}[{index}].volumeMounts is malformed; it must be a list.",
                )
            by_path = {
                _normalized_path(m["mountPath"]): m.get("name")
                for m in mounts or ()
                if isinstance(m, Mapping) and isinstance(m.get("mountPath"), str)
            }
            new_mounts = []
            for item in mounted:
                if item.mount_path not in by_path:
                    new_mounts.append(item.mount_json)
                elif (present := by_path[item.mount_path]) != item.volume_name:
                    return refuse(
                        REASON_MOUNT_CONFLICT,
                        f'Container "{str(container.get("name"))[:_SHOWN_NAME_LENGTH]}" already mounts volume '
                        f'"{str(present)[:_SHOWN_NAME_LENGTH]}" at {item.mount_path}; remove that mount, the path '
                        "is reserved for the import's credentials.",
                    )
            if not new_mounts:
                continue
            base = f"/spec/{field_name}/{index}/volumeMounts"
            if mounts is None:
                operations.append(_add(base, f"[{','.join(new_mounts)}]"))
            else:
                operations.extend(_add(f"{base}/-", m) for m in new_mounts)
    return Decision(allowed=True, patch_json=f"[{','.join(operations)}]")
