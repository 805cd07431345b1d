"""What an import adds to a pod, as the JSON fragments its patch is made of (pure, no decision).

webhook.mutation decides what a pod gets and refuses what collides; this module only builds it and reads what the
pod already has: per import its volume (its Secret; for a federated import, the projected volume of the Secret's
keys and the pod's own token) and its read-only mount, serialized once and cached (the same few imports come back
all day); the RFC 6902 "add" operations; and how to recognise an import's volume or a mount path already there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubemcsa.contract import api, federation

# Every list of containers in a pod spec: each container of each gets the imports' mounts.
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")

compact = json.JSONEncoder(separators=(",", ":")).encode

# What isinstance checks for an object: dict first, since parsed JSON objects are dicts, and the Mapping ABC's own
# check costs ~0.3 us, a dozen times per review.
MAPPING = (dict, Mapping)


@dataclass(frozen=True)
class Mounted:
    """One import as the pod gets it: its volume, Secret and mount path, and their JSON fragments."""

    name: str
    volume_name: str
    secret_name: str
    mount_path: str
    volume_json: str
    mount_json: str

    def projected_volume_json(self, audience: str, expiration_seconds: int) -> str:
        """This import's volume as a federated import has it: the Secret's keys and the pod's own token."""
        volume = federation.projected_volume(self.volume_name, self.secret_name, audience, expiration_seconds)
        return compact(volume)


@functools.lru_cache(maxsize=4096)
def _mounted(name: str, volume_name: str) -> Mounted:
    # Pure, and the same few imports come back all day: names derived and JSON serialized once, not per request.
    secret_name, mount_path = api.secret_name_for_import(name), api.mount_path_for_import(name)
    volume = {"name": volume_name, "secret": {"secretName": secret_name}}
    mount = {"name": volume_name, "mountPath": mount_path, "readOnly": True}
    return Mounted(name, volume_name, secret_name, mount_path, compact(volume), compact(mount))


_volume_name = functools.lru_cache(maxsize=4096)(api.volume_name_for_import)


def mounts_for(names: Sequence[str]) -> list[Mounted]:
    """The imports named, in order, each with a volume name of its own."""
    volume_names = [_volume_name(name) for name in names]
    if len(set(volume_names)) != len(volume_names):  # two hashed names collided: let api disambiguate
        volume_names = api.volume_names_for_imports(names)
    return [_mounted(name, volume_name) for name, volume_name in zip(names, volume_names, strict=True)]


@dataclass(frozen=True)
class Wanted:
    """The imports of a pod, with what to look for among its volumes and mounts (webhook.mutation's plan)."""

    mounted: tuple[Mounted, ...]
    volumes: frozenset[str]
    paths: frozenset[str]
    none_there: tuple[bool, ...]  # one False per import: nothing of it there yet


@functools.lru_cache(maxsize=256)
def lookup_tables(names: tuple[str, ...]) -> Wanted:
    """The imports named (at most MAX_IMPORTS_PER_POD: the key stays small), their volume names and mount paths."""
    mounted = tuple(mounts_for(names))
    return Wanted(
        mounted,
        frozenset(item.volume_name for item in mounted),
        frozenset(item.mount_path for item in mounted),
        (False,) * len(mounted),
    )


def containers_count(spec: Any) -> int:
    """How many containers (init, regular and ephemeral) a pod spec lists; 0 if it is not an object."""
    if not isinstance(spec, MAPPING):
        return 0
    return sum(len(c) for f in CONTAINER_FIELDS if isinstance(c := spec.get(f), list))


def is_import_volume(volume: Mapping[str, Any], secret_name: str) -> bool:
    """True if a volume of the pod already is the import's (reinvocation): its Secret volume, or the projected
    volume of a federated import, whose first source is that Secret."""
    secret = volume.get("secret")
    if isinstance(secret, MAPPING):
        return secret.get("secretName") == secret_name
    projected = volume.get("projected")
    sources = projected.get("sources") if isinstance(projected, MAPPING) else None
    first = sources[0] if isinstance(sources, list) and sources and isinstance(sources[0], MAPPING) else {}
    return isinstance(first.get("secret"), Mapping) and first["secret"].get("name") == secret_name


def volumes_by_name(volumes: Sequence[Any]) -> dict[str, Mapping[str, Any]]:
    """The pod's volumes by name. Only string names can collide with ours; anything else is the API server's
    validation to reject."""
    return {v["name"]: v for v in volumes if isinstance(v, MAPPING) and isinstance(v.get("name"), str)}


def mounts_by_path(mounts: Sequence[Any]) -> dict[str, Any]:
    """A container's mounts: normalized mount path -> the volume name mounted there."""
    return {
        _normalized_path(m["mountPath"]): m.get("name")
        for m in mounts
        if isinstance(m, MAPPING) and isinstance(m.get("mountPath"), str)
    }


def _normalized_path(path: str) -> str:
    return path.rstrip("/") or "/"


def add_operations(path: str, present: bool, values_json: Sequence[str]) -> list[str]:
    """The compact "add" operations that append these values to the list at `path`: one per value onto a list
    that is `present`, else one that creates the list."""
    if not present:
        return [_add(path, f"[{','.join(values_json)}]")]
    return [_add(f"{path}/-", value) for value in values_json]


def _add(path: str, value_json: str) -> str:
    # Paths are built here from field names and indexes: nothing to escape.
    return f'{{"op":"add","path":"{path}","value":{value_json}}}'
