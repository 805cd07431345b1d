"""A minimal OpenAPI v3 description of the served resources, enough for kubectl.

kubectl fetches /openapi/v3 to decide whether the server validates fields itself (`fieldValidation` on the
PATCH operation of each kind); if it finds that, it sends `?fieldValidation=Strict` instead of downloading
full schemas for client-side validation. Without /openapi/v2 or v3, `kubectl create -f` and `apply -f` fail.
Custom resources also get their CRD's schema as a component, which `kubectl explain` reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from kubemcsa_testing.resources import Registry, ResourceInfo, crd_schema

_QUERY_PARAMS = ("dryRun", "fieldManager", "fieldValidation", "force")


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _object_path(info: ResourceInfo) -> str:
    prefix = "/" + _gv_path(info.group, info.version)
    if info.namespaced:
        return f"{prefix}/namespaces/{{namespace}}/{info.plural}/{{name}}"
    return f"{prefix}/{info.plural}/{{name}}"


def gv_document(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    """The OpenAPI v3 document of one group/version (paths with kube's GVK extension, CRD schemas), or None."""
    infos = [i for i in registry.all() if i.group == group and i.version == version and i.stored]
    if not infos:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for info in sorted(infos, key=lambda i: i.plural):
        if info.custom:  # published with its GVK, as kube does, so that `kubectl explain` finds it
            schema = _custom_schema(registry, info)
            if schema is not None:
                schemas[_schema_name(info)] = schema
        gvk = {"group": info.group, "version": info.version, "kind": info.kind}
        params = [{"name": p, "in": "query", "schema": {"type": "string"}} for p in _QUERY_PARAMS]
        operation = {"x-kubernetes-group-version-kind": gvk, "parameters": params, "responses": {}}
        paths[_object_path(info)] = {
            "get": {"x-kubernetes-group-version-kind": gvk, "responses": {}},
            "put": operation,
            "patch": operation,
        }
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kubemcsa in-memory)", "version": "v1"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _schema_name(info: ResourceInfo) -> str:
    """kube's component name: the group reversed, then version and kind (io.admiralty.multicluster.v1alpha1.X)."""
    return ".".join([*reversed(info.group.split(".")), info.version, info.kind])


def _custom_schema(registry: Registry, info: ResourceInfo) -> dict[str, Any] | None:
    crd = registry.crd_for(info)
    schema = crd_schema(crd, info.version) if crd else None
    if schema is None:
        return None
    published = copy.deepcopy(schema)
    published["x-kubernetes-group-version-kind"] = [{"group": info.group, "kind": info.kind, "version": info.version}]
    return published


def root_document(registry: Registry) -> dict[str, Any]:
    """/openapi/v3: one entry per group/version, its URL carrying a hash that changes with its content."""
    paths = {}
    for group, versions in registry.group_versions().items():
        for version in versions:
            doc = gv_document(registry, group, version)
            if doc is None:
                continue
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()
            path = _gv_path(group, version)
            paths[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": paths}
