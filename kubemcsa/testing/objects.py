"""Putting objects into a cluster from tests and the demo, the way `kubectl create` does, tolerating re-runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa import kube


def create_or_get(client: ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Create `obj`; if it already exists (409), return the existing one unchanged."""
    resource = kube.Resource(client, kube.resource_type_of(obj))
    namespace = (obj.get("metadata") or {}).get("namespace")
    try:
        return resource.create(obj, namespace)
    except ApiException as exc:
        if exc.status != 409:
            raise
        return resource.get(obj["metadata"]["name"], namespace)


def create_file(client: ApiClient, path: Path, skip_kinds: tuple[str, ...] = ()) -> None:
    """create_or_get each document of a YAML file, except those of `skip_kinds`."""
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") not in skip_kinds:
            create_or_get(client, doc)
