"""Decide how to mutate a pod being created: which import Secrets to mount, or why to refuse it.

Pure logic: the pod, its namespace and a lookup in, a `Decision` out. The lookup is the only thing that may
reach the outside world (the webhook's watch-fed cache), and only once the pod has asked for imports.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from kubemcsa import api

# Refusal reasons: the label of the refusals metric, and a stable word for tests and logs.
REASON_IMPORT_NOT_FOUND = "ImportNotFound"
REASON_INVALID_IMPORT_NAME = "InvalidImportName"
REASON_VOLUME_CONFLICT = "VolumeConflict"
REASON_MOUNT_CONFLICT = "MountConflict"
REASON_INVALID_POD = "InvalidPod"
REASON_LOOKUP_FAILED = "LookupFailed"

_CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


class ImportLookup(Protocol):
    """What the decision needs to know about the cluster (implemented by the webhook's cache)."""

    def namespace_labels(self, namespace: str) -> Mapping[str, str] | None:
        """The labels of a namespace, or None if it does not exist."""
        ...

    def import_exists(self, namespace: str, name: str) -> bool:
        """True if a ServiceAccountImport with this name exists in this namespace."""
        ...


class LookupFailed(Exception):
    """The lookup could not tell (API unreachable); the message says so without any secret."""


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
    """The import names the pod asks for ([] if none), or None if its metadata is malformed."""
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
    return api.parse_import_annotation(value)


def _quoted(names: list[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def decide(pod: Any, namespace: str, lookup: ImportLookup) -> Decision:
    """Decide what to do with a pod created in `namespace`.

    No annotation, or a namespace that is not enabled: allowed untouched (even if the API server's
    namespaceSelector is misconfigured). Otherwise every import must exist in the namespace, and the pod
    gets one Secret volume per import and one read-only mount per import in every container; what is
    already there (reinvocation) is not added again, and what collides with the pod's own volumes or
    mounts is refused. May raise LookupFailed.
    """
    if not isinstance(pod, Mapping):
        return refuse(
            REASON_INVALID_POD, "The request's object is not a pod; only pods can be admitted by this webhook."
        )
    names = requested_imports(pod)
    if names is None:
        return refuse(
            REASON_INVALID_POD,
            f"The pod's metadata.annotations is malformed; set {api.IMPORT_ANNOTATION} to a comma-separated string.",
        )
    if not names:
        return ALLOW
    if not (isinstance(namespace, str) and api.is_dns_label(namespace)):
        return refuse(
            REASON_INVALID_POD, "The pod's namespace is not a valid namespace name; create it in a namespace."
        )
    if not api.namespace_enabled(lookup.namespace_labels(namespace)):
        return ALLOW

    invalid = [name for name in names if not api.is_dns_subdomain(name)]
    if invalid:
        return refuse(
            REASON_INVALID_IMPORT_NAME,
            f"{api.IMPORT_ANNOTATION} names {_quoted(invalid)}, which {'is' if len(invalid) == 1 else 'are'} not a "
            "valid ServiceAccountImport name; use lowercase names of ServiceAccountImports, separated by commas.",
        )
    missing = [name for name in names if not lookup.import_exists(namespace, name)]
    if missing:
        plural = len(missing) > 1
        return refuse(
            REASON_IMPORT_NOT_FOUND,
            f"ServiceAccountImport{'s' if plural else ''} {_quoted(missing)} "
            f'{"do" if plural else "does"} not exist in namespace "{namespace}"; create '
            f"{'them' if plural else 'it'} there first (kubectl get serviceaccountimports -n {namespace}) "
            f"or fix the pod's {api.IMPORT_ANNOTATION} annotation.",
        )
    return plan_patch(pod, names)


@functools.lru_cache(maxsize=4096)
def _names_for(name: str) -> tuple[str, str, str]:
    """(volume name, Secret name, mount path) of an import: pure, and the same few names come back all day."""
    return api.volume_name_for_import(name), api.secret_name_for_import(name), api.mount_path_for_import(name)


@functools.lru_cache(maxsize=4096)
def _fragments_for(name: str) -> tuple[str, str]:
    """The compact JSON of an import's volume and of its mount: serialized once, not on every request."""
    return _compact(_volume_for(name)), _compact(_mount_for(name))


_compact = json.JSONEncoder(separators=(",", ":")).encode


def _add(path: str, value_json: str) -> str:
    # Paths are built here from field names and indexes: nothing to escape.
    return f'{{"op":"add","path":"{path}","value":{value_json}}}'


def _volume_for(name: str) -> dict[str, Any]:
    volume_name, secret_name, _ = _names_for(name)
    return {"name": volume_name, "secret": {"secretName": secret_name}}


def _mount_for(name: str) -> dict[str, Any]:
    volume_name, _, mount_path = _names_for(name)
    return {"name": volume_name, "mountPath": mount_path, "readOnly": True}


def _normalized_path(path: str) -> str:
    return path.rstrip("/") or "/"


def plan_patch(pod: Mapping[str, Any], names: list[str]) -> Decision:
    """The RFC 6902 operations that mount these imports into the pod, or a refusal if they collide."""
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return refuse(REASON_INVALID_POD, "The pod has no valid spec; it must be an object with containers.")
    operations: list[str] = []  # each one compact JSON

    volumes = spec.get("volumes")
    if volumes is not None and not isinstance(volumes, list):
        return refuse(REASON_INVALID_POD, "The pod's spec.volumes is malformed; it must be a list.")
    # Only string names can collide with ours; anything else is the API server's validation to reject.
    existing_volumes = {
        v["name"]: v for v in volumes or () if isinstance(v, Mapping) and isinstance(v.get("name"), str)
    }
    new_volumes = []
    for name in names:
        volume_name, secret_name, _ = _names_for(name)
        existing = existing_volumes.get(volume_name)
        if existing is None:
            new_volumes.append(_fragments_for(name)[0])
            continue
        secret = existing.get("secret")
        if not (isinstance(secret, Mapping) and secret.get("secretName") == secret_name):
            return refuse(
                REASON_VOLUME_CONFLICT,
                f'The pod already has a volume named "{volume_name}" that is not the Secret of '
                f'ServiceAccountImport "{name}"; rename that volume, the name is reserved for the import.',
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
            for name in names:
                volume_name, _, mount_path = _names_for(name)
                if mount_path not in by_path:
                    new_mounts.append(_fragments_for(name)[1])
                elif (present := by_path[mount_path]) != volume_name:
                    return refuse(
                        REASON_MOUNT_CONFLICT,
                        f'Container "{container.get("name")}" already mounts volume "{present}" at '
                        f"{mount_path}; remove that mount, the path is reserved for the import's credentials.",
                    )
            if not new_mounts:
                continue
            base = f"/spec/{field_name}/{index}/volumeMounts"
            if mounts is None:
                operations.append(_add(base, f"[{','.join(new_mounts)}]"))
            else:
                operations.extend(_add(f"{base}/-", m) for m in new_mounts)
    return Decision(allowed=True, patch_json=f"[{','.join(operations)}]")
