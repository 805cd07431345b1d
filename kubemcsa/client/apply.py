"""Create or update objects idempotently and say what happened: the applier behind bootstrap, allow and federate.

The pure part compares what is wanted with what exists (`is_subset`, `needs_update`, `merged`, `stale_bindings`); the
`Applier` makes the calls on one cluster and reports each `Step`; an error is one sentence naming the cluster and
the object, with the advice for it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import urllib3
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract import api

JSON = dict[str, Any]


MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"


MANAGED_BY_VALUE = "kubemcsa"


class ApplyError(Exception):
    """Applying failed: one sentence saying which cluster and object, and what to do. Never holds a token."""


@dataclass
class Step:
    """What happened to one object: created, updated, unchanged or deleted."""

    side: str  # "source" or "target"
    cluster: str
    kind: str
    name: str
    namespace: str | None
    action: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.side} cluster {self.cluster!r}: {self.kind} {where} {self.action}"


@dataclass
class Result:
    steps: list[Step] = field(default_factory=list)

    def count(self, action: str) -> int:
        return sum(1 for step in self.steps if step.action == action)

    @property
    def changed(self) -> bool:
        return any(step.action != "unchanged" for step in self.steps)

    def summary(self) -> str:
        if not self.changed:
            return "Nothing to do: both clusters were already bootstrapped (every object unchanged)."
        counts = ", ".join(f"{self.count(a)} {a}" for a in ("created", "updated", "deleted", "unchanged"))
        return f"Bootstrap complete: {counts}."


_META_KEYS = ("apiVersion", "kind", "metadata", "status")


def is_subset(desired: Any, existing: Any) -> bool:
    """True if `existing` has everything `desired` has (the server may add defaults, e.g. an empty apiGroup).

    Dicts compare key by key (missing or empty desired values are ignored), lists element by element.
    """
    if isinstance(desired, dict):
        if not isinstance(existing, dict):
            return not any(_present(v) for v in desired.values())
        return all(is_subset(v, existing.get(k)) for k, v in desired.items() if _present(v))
    if isinstance(desired, list):
        if not isinstance(existing, list) or len(desired) != len(existing):
            return not desired and not existing
        return all(is_subset(d, e) for d, e in zip(desired, existing, strict=True))
    return desired == existing


def _present(value: Any) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def needs_update(existing: JSON, desired: JSON) -> bool:
    """True if `existing` lacks a label, an annotation or a field of `desired`."""
    meta_d, meta_e = desired.get("metadata") or {}, existing.get("metadata") or {}
    for key in ("labels", "annotations"):
        if not is_subset(meta_d.get(key) or {}, meta_e.get(key) or {}):
            return True
    return any(not is_subset(v, existing.get(k)) for k, v in desired.items() if k not in _META_KEYS)


def needs_recreate(existing: JSON, desired: JSON) -> bool:
    """True if the difference is in a field the API server will not update (a binding's roleRef)."""
    return "roleRef" in desired and not is_subset(desired["roleRef"], existing.get("roleRef"))


def merged(existing: JSON, desired: JSON) -> JSON:
    """`existing` with the labels, annotations and fields of `desired`: what to PUT, keeping everything else."""
    body = copy.deepcopy(existing)
    meta = body.setdefault("metadata", {})
    for key in ("labels", "annotations", "ownerReferences"):
        if key in (desired.get("metadata") or {}):
            if key == "ownerReferences":
                meta[key] = _merge_owner_references(meta.get(key) or [], desired["metadata"][key])
            else:
                meta[key] = {**(meta.get(key) or {}), **desired["metadata"][key]}
    for key, value in desired.items():
        if key not in _META_KEYS:
            body[key] = copy.deepcopy(value)
    return body


def _merge_owner_references(existing: list[JSON], desired: list[JSON]) -> list[JSON]:
    # Replace references to the same kind and name (e.g. to an import that was deleted and recreated).
    keys = {(ref.get("kind"), ref.get("name")) for ref in desired}
    return [ref for ref in existing if (ref.get("kind"), ref.get("name")) not in keys] + copy.deepcopy(desired)


def stale_bindings(existing: list[JSON], desired: list[JSON]) -> list[JSON]:
    """Bindings bootstrap made earlier for this target that the current plan no longer wants."""
    wanted = {(o["kind"], (o["metadata"].get("namespace")), o["metadata"]["name"]) for o in desired}
    return [
        o
        for o in existing
        if (o.get("kind"), o["metadata"].get("namespace"), o["metadata"].get("name")) not in wanted
        and (o["metadata"].get("labels") or {}).get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE
    ]


@dataclass(frozen=True)
class Cluster:
    """One side of the bootstrap: an admin client, the cluster's name, and where others reach it."""

    side: str  # "source" or "target"
    name: str
    client: ApiClient
    server: str = ""
    ca_pem: bytes = b""

    def __repr__(self) -> str:
        return f"Cluster(side={self.side!r}, name={self.name!r}, server={self.server!r})"


def _describe(obj: JSON) -> str:
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/{meta.get('name')}" if meta.get("namespace") else meta.get("name")
    return f"{obj.get('kind')} {where}"


ADMIN_ADVICE = "use a context with cluster-admin rights there"


def _advice(exc: BaseException, cluster: Cluster, obj: JSON, admin_advice: str = ADMIN_ADVICE) -> str:
    what = f"{cluster.side} cluster {cluster.name!r}"
    if isinstance(exc, ApiException):
        reason = kube.error_reason(exc)
        if exc.status == 404 and obj.get("kind") == api.KIND:
            return (
                f"{what} does not serve {api.KIND}: install multicluster-service-account there first "
                "(kubectl apply -k manifests/)."
            )
        if exc.status == 404 and obj.get("kind") == "RoleBinding":
            ns = obj["metadata"]["namespace"]
            return f"{what} has no namespace {ns!r}: create it or remove it from --source-namespaces."
        if exc.status in (401, 403) or reason in ("Forbidden", "Unauthorized"):
            return f"{what} refused to write {_describe(obj)}: {admin_advice}."
        return (
            f"{what} refused to write {_describe(obj)} ({kube.error_message(exc)}); fix that and run bootstrap again."
        )
    return f"cannot reach {what} at {cluster.server or 'its server'}: check the context and the network."


class Applier:
    """Brings objects of one cluster to a desired state, reporting each step (shared by bootstrap and allow)."""

    def __init__(
        self, cluster: Cluster, result: Result, report: Callable[[str], None], admin_advice: str = ADMIN_ADVICE
    ) -> None:
        self.cluster = cluster
        self.result = result
        self.report = report
        self.admin_advice = admin_advice

    def step(self, obj: JSON, action: str) -> None:
        meta = obj.get("metadata") or {}
        step = Step(
            self.cluster.side, self.cluster.name, obj["kind"], meta.get("name", ""), meta.get("namespace"), action
        )
        self.result.steps.append(step)
        self.report(str(step))

    def call(self, obj: JSON, fn: Callable[[], JSON]) -> JSON:
        try:
            return fn()
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApplyError(_advice(exc, self.cluster, obj, self.admin_advice)) from None

    def ensure(self, desired: JSON) -> JSON:
        """Create `desired`, or bring the existing object up to it; report and return the object as stored."""
        resource = kube.Resource(self.cluster.client, kube.resource_type_of(desired))
        meta = desired["metadata"]
        namespace = meta.get("namespace")
        try:
            existing = resource.get(meta["name"], namespace=namespace)
        except ApiException as exc:
            if exc.status != 404 or kube.error_reason(exc) not in ("NotFound", ""):
                raise ApplyError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
            if desired["kind"] == api.KIND and not kube.error_status(exc).get("details", {}).get("name"):
                # The type itself is missing.
                raise ApplyError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
            existing = None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApplyError(_advice(exc, self.cluster, desired, self.admin_advice)) from None
        if existing is None:
            stored = self.call(desired, lambda: resource.create(desired, namespace=namespace))
            self.step(desired, "created")
            return stored
        if not needs_update(existing, desired):
            self.step(desired, "unchanged")
            return existing
        if needs_recreate(existing, desired):
            self.call(desired, lambda: resource.delete(meta["name"], namespace=namespace))
            stored = self.call(desired, lambda: resource.create(desired, namespace=namespace))
        else:
            stored = self.call(desired, lambda: resource.replace(merged(existing, desired), namespace=namespace))
        self.step(desired, "updated")
        return stored

    def delete(self, obj: JSON) -> None:
        resource = kube.Resource(self.cluster.client, kube.resource_type_of(obj))
        meta = obj["metadata"]
        try:
            resource.delete(meta["name"], namespace=meta.get("namespace"))
        except ApiException as exc:
            if exc.status != 404:
                raise ApplyError(_advice(exc, self.cluster, obj, self.admin_advice)) from None
        self.step(obj, "deleted")

    def list_managed(self, resource_type: kube.ResourceType, selector: str) -> list[JSON]:
        resource = kube.Resource(self.cluster.client, resource_type)
        probe = {"kind": resource_type.kind, "metadata": {"name": f"({selector})"}}
        items = self.call(probe, lambda: resource.list(label_selector=selector)).get("items") or []
        for item in items:
            item.setdefault("kind", resource_type.kind)
        return items
