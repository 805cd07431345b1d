"""Decide how to mutate a pod being created: which import Secrets to mount, or why to refuse it.

Pure logic: the pod, its namespace and a lookup in, a `Decision` out. The lookup is the only thing that may
reach the outside world (the webhook's watch-fed cache), and only once the pod has asked for imports. What an
import adds to a pod (its volume, its mounts, as JSON fragments) is built by webhook.mounts; what collides with the
pod's own volumes and mounts is refused here.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kubemcsa.contract import api
from webhook import mounts
from webhook.mounts import MAPPING

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
    value = _import_annotation(pod)
    if value is None or value is _MALFORMED:
        return None if value is _MALFORMED else []
    return list(_parsed_annotation(value)[0])


_MALFORMED = object()


def _import_annotation(pod: Mapping[str, Any]) -> Any:
    """The pod's import annotation: its value, None if absent, or _MALFORMED."""
    metadata = pod.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, MAPPING):
        return _MALFORMED
    annotations = metadata.get("annotations")
    if annotations is None:
        return None
    if not isinstance(annotations, MAPPING):
        return _MALFORMED
    value = annotations.get(api.IMPORT_ANNOTATION)
    if value is None or isinstance(value, str):
        return value
    return _MALFORMED


# The pods of a workload carry the same annotation: short values are parsed and checked once (at most 1024 of at
# most 512 characters kept); long ones every time.
_CACHED_ANNOTATION_CHARS = 512


def _parsed_annotation(value: str) -> tuple[tuple[str, ...], bool]:
    """The names in an annotation value (at most MAX_IMPORTS_PER_POD + 1), and whether all are valid names."""
    if len(value) <= _CACHED_ANNOTATION_CHARS:
        return _parsed_short_annotation(value)
    return _parse_annotation(value)


def _parse_annotation(value: str) -> tuple[tuple[str, ...], bool]:
    names = tuple(api.parse_import_annotation(value, limit=api.MAX_IMPORTS_PER_POD))
    return names, all(api.is_dns_subdomain(name) for name in names)


_parsed_short_annotation = functools.lru_cache(maxsize=1024)(_parse_annotation)


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
    if not isinstance(pod, MAPPING):
        return Prepared(
            refuse(REASON_INVALID_POD, "The request's object is not a pod; only pods can be admitted by this webhook.")
        )
    value = _import_annotation(pod)
    if value is _MALFORMED:
        return Prepared(
            refuse(
                REASON_INVALID_POD,
                f"The pod's metadata.annotations is malformed; set {api.IMPORT_ANNOTATION} to a comma-separated "
                "string.",
            )
        )
    names, valid = _parsed_annotation(value) if value is not None else ((), True)
    if not names:
        return Prepared(ALLOW)
    if len(names) > api.MAX_IMPORTS_PER_POD:
        return Prepared(None, names)
    if not valid:
        invalid = [name for name in names if not api.is_dns_subdomain(name)]
        # Only the start of a name is ever shown: the rest is not kept (nor sent back from a worker process).
        return Prepared(None, _shown(names), _shown(invalid))
    spec = pod.get("spec")
    count = mounts.containers_count(spec)
    if max_mounts is not None and len(names) * count > max_mounts:
        raise TooMuchWork
    return Prepared(None, names, planned=_plan_patch_of(spec, names, count))


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
    for item in mounts.mounts_for(names):
        token = federated.get(item.name)
        if token is None:
            continue
        patch_json = patch_json.replace(
            item.volume_json, item.projected_volume_json(token.audience, token.expiration_seconds)
        )
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


def plan_patch(pod: Mapping[str, Any], names: Sequence[str]) -> Decision:
    """The RFC 6902 operations that mount these imports into the pod, or a refusal if they collide."""
    spec = pod.get("spec")
    return _plan_patch_of(spec, tuple(names), mounts.containers_count(spec))


def _plan_patch_of(spec: Any, names: tuple[str, ...], containers_count: int) -> Decision:
    """plan_patch of a pod with this spec and this many containers (mounts.containers_count)."""
    if not isinstance(spec, MAPPING):
        return refuse(REASON_INVALID_POD, "The pod has no valid spec; it must be an object with containers.")
    if containers_count > MAX_CONTAINERS:
        return refuse(
            REASON_TOO_MANY_CONTAINERS,
            f"The pod has {containers_count} containers; the webhook mounts imports into pods of at most "
            f"{MAX_CONTAINERS} containers (init and ephemeral ones included).",
        )
    shape = _shape(spec, names)
    if shape is None:  # a collision or a malformed list: the full planner says which, in its message
        return _plan_patch(spec, names)
    if len(names) * containers_count <= _CACHED_MAX_MOUNTS:
        return _planned(shape)
    return _planned.__wrapped__(shape)


# Pods of one workload share their shape (the same imports, volumes and mounts), so the patch of a shape is
# built once: at most _CACHED_SHAPES patches of at most _CACHED_MAX_MOUNTS mounts (some 10 KiB each) are kept.
_CACHED_SHAPES = 256
_CACHED_MAX_MOUNTS = 64

# What the patch depends on, as hashable data: the names; whether spec.volumes exists and, per import, whether
# its volume is already there; and per container (field, index, whether volumeMounts exists, and per import
# whether its mount is already there).
_Shape = tuple[tuple[str, ...], bool, tuple[bool, ...], tuple[tuple[str, int, bool, tuple[bool, ...]], ...]]


def _shape(spec: Mapping[str, Any], names: tuple[str, ...]) -> _Shape | None:
    """The pod's shape for these imports, or None if anything of it collides with them or is malformed."""
    wanted = mounts.lookup_tables(names)
    mounted = wanted.mounted
    volumes = spec.get("volumes")
    if volumes is None:
        volumes_there = wanted.none_there
    elif not isinstance(volumes, list):
        return None
    else:
        # As mounts.volumes_by_name, restricted to the imports' names (the last of a name counts).
        existing = {}
        for volume in volumes:
            if isinstance(volume, MAPPING) and isinstance(name := volume.get("name"), str) and name in wanted.volumes:
                existing[name] = volume
        if not existing:
            volumes_there = wanted.none_there
        else:
            there = []
            for item in mounted:
                volume = existing.get(item.volume_name)
                if volume is not None and not mounts.is_import_volume(volume, item.secret_name):
                    return None
                there.append(volume is not None)
            volumes_there = tuple(there)
    containers: list[tuple[str, int, bool, tuple[bool, ...]]] = []
    for field_name in mounts.CONTAINER_FIELDS:
        listed = spec.get(field_name)
        if listed is None:
            continue
        if not isinstance(listed, list):
            return None
        for index, container in enumerate(listed):
            if not isinstance(container, MAPPING):
                return None
            present = container.get("volumeMounts")
            mounts_there = wanted.none_there
            if present is not None:
                if not isinstance(present, list):
                    return None
                # As mounts.mounts_by_path, restricted to the imports' paths (the last at a path counts).
                by_path = {}
                for mount in present:
                    if isinstance(mount, MAPPING) and isinstance(path := mount.get("mountPath"), str):
                        path = path.rstrip("/") or "/"
                        if path in wanted.paths:
                            by_path[path] = mount.get("name")
                if by_path:
                    there = []
                    for item in mounted:
                        if item.mount_path in by_path and by_path[item.mount_path] != item.volume_name:
                            return None
                        there.append(item.mount_path in by_path)
                    mounts_there = tuple(there)
            containers.append((field_name, index, present is not None, mounts_there))
    return names, volumes is not None, volumes_there, tuple(containers)


@functools.lru_cache(maxsize=_CACHED_SHAPES)
def _planned(shape: _Shape) -> Decision:
    """The patch of a pod of this shape (one that collides with nothing)."""
    names, volumes_present, volumes_there, containers = shape
    mounted = mounts.mounts_for(names)
    new_volumes = [item.volume_json for item, there in zip(mounted, volumes_there, strict=True) if not there]
    operations = mounts.add_operations("/spec/volumes", volumes_present, new_volumes) if new_volumes else []
    for field_name, index, present, mounts_there in containers:
        new_mounts = [item.mount_json for item, there in zip(mounted, mounts_there, strict=True) if not there]
        if new_mounts:
            operations.extend(mounts.add_operations(f"/spec/{field_name}/{index}/volumeMounts", present, new_mounts))
    return Decision(allowed=True, patch_json=f"[{','.join(operations)}]")


def _plan_patch(spec: Mapping[str, Any], names: Sequence[str]) -> Decision:
    """plan_patch for any spec, collisions and malformed lists included (each refused with what to fix)."""
    mounted = mounts.mounts_for(names)
    operations = _volume_operations(spec, mounted)  # each one compact JSON
    if isinstance(operations, Decision):
        return operations
    for field_name in mounts.CONTAINER_FIELDS:
        containers = spec.get(field_name)
        if containers is None:
            continue
        if not isinstance(containers, list):
            return refuse(REASON_INVALID_POD, f"The pod's spec.{field_name} is malformed; it must be a list.")
        for index, container in enumerate(containers):
            added = _mount_operations(field_name, index, container, mounted)
            if isinstance(added, Decision):
                return added
            operations.extend(added)
    return Decision(allowed=True, patch_json=f"[{','.join(operations)}]")


def _volume_operations(spec: Mapping[str, Any], mounted: Sequence[mounts.Mounted]) -> list[str] | Decision:
    """The operations adding the imports' volumes the pod lacks, or a refusal if one of its own has that name."""
    volumes = spec.get("volumes")
    if volumes is not None and not isinstance(volumes, list):
        return refuse(REASON_INVALID_POD, "The pod's spec.volumes is malformed; it must be a list.")
    existing_volumes = mounts.volumes_by_name(volumes or ())
    new_volumes = []
    for item in mounted:
        existing = existing_volumes.get(item.volume_name)
        if existing is None:
            new_volumes.append(item.volume_json)
        elif not mounts.is_import_volume(existing, item.secret_name):
            return refuse(
                REASON_VOLUME_CONFLICT,
                f'The pod already has a volume named "{item.volume_name}" that is not the Secret of '
                f'ServiceAccountImport "{item.name}"; rename that volume, the name is reserved for the import.',
            )
    if not new_volumes:
        return []
    return mounts.add_operations("/spec/volumes", volumes is not None, new_volumes)


def _mount_operations(
    field_name: str, index: int, container: Any, mounted: Sequence[mounts.Mounted]
) -> list[str] | Decision:
    """The operations adding the imports' mounts that container `index` of spec.`field_name` lacks, or a refusal
    if it mounts something else at one of their paths."""
    where = f"spec.{field_name}[{index}]"
    if not isinstance(container, MAPPING):
        return refuse(REASON_INVALID_POD, f"The pod's {where} is malformed.")
    present = container.get("volumeMounts")
    if present is not None and not isinstance(present, list):
        return refuse(REASON_INVALID_POD, f"The pod's {where}.volumeMounts is malformed; it must be a list.")
    by_path = mounts.mounts_by_path(present or ())
    new_mounts = []
    for item in mounted:
        if item.mount_path not in by_path:
            new_mounts.append(item.mount_json)
        elif (there := by_path[item.mount_path]) != item.volume_name:
            return refuse(
                REASON_MOUNT_CONFLICT,
                f'Container "{str(container.get("name"))[:_SHOWN_NAME_LENGTH]}" already mounts volume '
                f'"{str(there)[:_SHOWN_NAME_LENGTH]}" at {item.mount_path}; remove that mount, the path '
                "is reserved for the import's credentials.",
            )
    if not new_mounts:
        return []
    return mounts.add_operations(f"/spec/{field_name}/{index}/volumeMounts", present is not None, new_mounts)
