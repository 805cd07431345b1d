"""JSON merge patch (RFC 7386), JSON patch (RFC 6902) and strategic merge patch, as pure functions.

Strategic merge patch knows the merge keys of the lists this project touches (pod volumes, containers,
volume mounts, env, ports, ...); other lists are replaced, as kube does for lists without a merge key.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from kubemcsa_testing.errors import StatusError

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_PATCH)

# field name -> merge key, for lists merged by key in strategic merge patch (wherever they appear).
MERGE_KEYS: dict[str, str] = {
    "volumes": "name",
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "env": "name",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "hostAliases": "ip",
    "tolerations": "",  # atomic (replaced)
    "secrets": "name",
}
# Lists of scalars merged as sets.
SET_LISTS = ("finalizers",)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902; a patch that does not apply is a StatusError as kube answers it (500 for a failed op)."""
    if not isinstance(operations, list):
        raise StatusError(400, "BadRequest", "the JSON patch must be a list of operations")
    try:
        return jsonpatch.JsonPatch(operations).apply(target)
    except jsonpatch.JsonPatchConflict as exc:
        raise StatusError(422, "Invalid", f"the JSON patch does not apply: {exc}") from None
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, KeyError) as exc:
        raise StatusError(422, "Invalid", f"the JSON patch does not apply: {exc}") from None
    except Exception as exc:  # malformed operations (missing "op", bad pointer syntax, ...)
        raise StatusError(400, "BadRequest", f"the JSON patch is malformed: {exc}") from None


def strategic_merge_patch(target: Any, patch: Any, field_name: str = "") -> Any:
    """Strategic merge: like merge patch, but known lists merge by key and `finalizers` merge as a set."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/") and isinstance(value, list):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in value]
            continue
        if key.startswith("$"):
            continue  # other directives ($retainKeys, $setElementOrder) only order or prune; ignored
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and isinstance(result.get(key), list):
            result[key] = _merge_list(key, result[key], value)
        else:
            result[key] = strategic_merge_patch(result.get(key), value, key)
    return result


def _merge_list(field_name: str, current: list[Any], patch: list[Any]) -> list[Any]:
    merge_key = MERGE_KEYS.get(field_name)
    if field_name in SET_LISTS:
        return current + [v for v in patch if v not in current]
    if not merge_key or not all(isinstance(v, dict) and merge_key in v for v in patch):
        return copy.deepcopy(patch)
    result = [copy.deepcopy(v) for v in current]
    positions = {
        item.get(merge_key): i for i, item in enumerate(result) if isinstance(item, dict) and merge_key in item
    }
    for item in patch:
        if item.get("$patch") == "delete":
            if item[merge_key] in positions:
                result[positions[item[merge_key]]] = None
            continue
        if item[merge_key] in positions:
            i = positions[item[merge_key]]
            result[i] = strategic_merge_patch(result[i], item)
        else:
            positions[item[merge_key]] = len(result)
            result.append(strategic_merge_patch({}, item))
    return [v for v in result if v is not None]


def apply_patch(content_type: str, target: dict[str, Any], patch: Any) -> Any:
    """Apply a patch of the given media type (no parameters) to a copy of `target`."""
    if content_type == JSON_PATCH:
        return json_patch(copy.deepcopy(target), patch)
    if not isinstance(patch, dict):
        raise StatusError(400, "BadRequest", "a merge patch must be a JSON object")
    if content_type == MERGE_PATCH:
        return merge_patch(target, patch)
    return strategic_merge_patch(target, patch)
