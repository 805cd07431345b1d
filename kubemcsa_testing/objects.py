"""Putting objects into a cluster from tests and the demo, the way `kubectl create` does, tolerating re-runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract import api, imports
from kubemcsa_testing.wait import wait_for


def create_or_get(client: ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj`; if it already exists (409), return the existing one unchanged. A CustomResourceDefinition is
    waited for until Established (`kubectl wait --for condition=established`): a real API server serves its
    resources a moment after the create returns."""
    resource = kube.Resource(client, kube.resource_type_of(obj))
    namespace = (obj.get("metadata") or {}).get("namespace")
    try:
        created = resource.create(obj, namespace)
    except ApiException as exc:
        if exc.status != 409:
            raise
        created = resource.get(obj["metadata"]["name"], namespace)
    if obj.get("kind") == "CustomResourceDefinition":
        wait_established(client, obj["metadata"]["name"])
    return created


def wait_established(client: ApiClient, name: str, timeout: float = 30.0) -> None:
    """Until the CustomResourceDefinition `name` says Established=True."""
    crds = kube.Resource(client, kube.resource_type_of({"apiVersion": "apiextensions.k8s.io/v1",
                                                        "kind": "CustomResourceDefinition"}))  # fmt: skip

    def established() -> bool:
        conditions = (crds.get(name).get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

    wait_for(established, f"CustomResourceDefinition {name} to be established", timeout=timeout)


def create_file(client: ApiClient, path: Path, skip_kinds: tuple[str, ...] = ()) -> None:
    """create_or_get each document of a YAML file, except those of `skip_kinds`."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") not in skip_kinds:
            create_or_get(client, doc)


def create_pinned_credential(client: ApiClient, secret: dict[str, Any]) -> dict[str, Any]:
    """Create a source credential Secret of the system namespace as `kubemcsa bootstrap` does, as an admin: pinned
    first in its import's status (kubemcsa.contract.imports), or the controller would not use it. Its import must
    exist."""
    meta = secret["metadata"]
    name = meta["labels"][api.IMPORT_LABEL]
    resource = kube.Resource(client, kube.SERVICE_ACCOUNT_IMPORTS)
    for _ in range(10):  # a running controller may write the import's status in between: read it again
        owner = resource.get(name, meta["namespace"])
        pins = imports.pins_patch(owner, imports.pins_for_write(owner, None, secret))
        try:
            resource.patch_status(name, pins, meta["namespace"])
            break
        except ApiException as exc:
            if exc.status != 409:
                raise
    return create_or_get(client, secret)
