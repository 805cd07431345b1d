"""An import's status and conditions: the one condition merger (metav1.Condition rules) and the status patch,
used by plan and by every output. Pure.
"""

from __future__ import annotations

from typing import Any

from kubemcsa.contract import api
from kubemcsa.contract.imports import (
    STATUS_PINS,
    as_dict,
    as_list,
    metadata_of,
)
from kubemcsa.contract.timefmt import format_time


def set_condition(conditions: Any, new: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Conditions with `new` set, keeping lastTransitionTime when the status did not change (metav1.Condition rules)."""
    result: list[dict[str, Any]] = []
    replaced = False
    for cond in as_list(conditions):
        if not isinstance(cond, dict):
            continue
        if cond.get("type") == new["type"]:
            merged = dict(new)
            same = cond.get("status") == new["status"] and cond.get("lastTransitionTime")
            merged["lastTransitionTime"] = cond["lastTransitionTime"] if same else format_time(now)
            result.append(merged)
            replaced = True
        else:
            result.append(cond)
    if not replaced:
        result.append({**new, "lastTransitionTime": format_time(now)})
    return result


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new` (fields that disappear are set to null).

    The credential pins are left alone: only the writer of a credential records them, with a patch of its own
    guarded by the import's resourceVersion (kubemcsa.contract.imports.pins_patch), so a stale status never undoes
    them."""
    patch: dict[str, Any] = {key: None for key in (old or {}) if key not in new and key != STATUS_PINS}
    patch.update({key: value for key, value in new.items() if key != STATUS_PINS})
    return {"status": patch}


def ready_condition(status: str, reason: str, message: str, imp: dict[str, Any]) -> dict[str, Any]:
    cond = {"type": api.CONDITION_READY, "status": status, "reason": reason, "message": message}
    generation = metadata_of(imp).get("generation")
    if isinstance(generation, int):
        cond["observedGeneration"] = generation
    return cond


def import_status(
    imp: dict[str, Any],
    now: float,
    ready: dict[str, Any],
    secret_name: str | None,
    issued_at: float | None,
    expires_at: float | None,
    remote_user: str | None = None,
) -> dict[str, Any] | None:
    """The new status, or None if it equals the current one (so the steady state writes nothing)."""
    old = as_dict(imp.get("status"))
    new: dict[str, Any] = {}
    if STATUS_PINS in old:  # not this pass's to change (see status_patch)
        new[STATUS_PINS] = old[STATUS_PINS]
    if secret_name:
        new["secrets"] = [{"name": secret_name}]
    new["conditions"] = set_condition(old.get("conditions"), ready, now)
    if expires_at is not None:
        new["expirationTimestamp"] = format_time(expires_at)
    if issued_at is not None:
        new["lastRefreshTime"] = format_time(issued_at)
    if remote_user is not None:
        new["remoteUser"] = remote_user
    generation = metadata_of(imp).get("generation")
    if isinstance(generation, int):
        new["observedGeneration"] = generation
    return None if new == old else new


def condition_changed(imp: dict[str, Any], ready: dict[str, Any]) -> bool:
    for cond in as_list(as_dict(imp.get("status")).get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == api.CONDITION_READY:
            return (cond.get("status"), cond.get("reason"), cond.get("message")) != (
                ready["status"],
                ready["reason"],
                ready["message"],
            )
    return True
