"""The resource registry of the in-memory API server: which resources exist, and the discovery documents.

Built-in resources are fixed; custom resources come and go with their CustomResourceDefinitions. A resource
is reached by (group, version, plural); its objects live in one storage shared by all versions of the
resource (`storage_key`), as in kube-apiserver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
READ_WRITE_STATUS = ("get", "patch", "update")


@dataclass(frozen=True)
class ResourceInfo:
    """One served resource, e.g. ("", "v1", "secrets")."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[str, ...] = ()  # e.g. ("status",), ("token",)
    categories: tuple[str, ...] = ()
    # Tracks metadata.generation, bumped on changes outside metadata and status.
    has_generation: bool = False
    # PUT without metadata.resourceVersion is allowed (false for custom resources and CRDs, as in kube).
    unconditional_update: bool = True
    # "subdomain" (RFC 1123 subdomain), "label" (RFC 1123 label) or "path" (any path segment, RBAC names).
    name_rule: str = "subdomain"
    # Objects are stored (false for create-only reviews such as TokenReview).
    stored: bool = True
    # Defined by a CRD (its schema lives there).
    custom: bool = False
    storage: str = ""  # storage key override (events.k8s.io events share core events' storage)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> str:
        return self.storage or f"{self.group}/{self.plural}"

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    def qualified(self) -> str:
        """The name kube uses in messages: `secrets`, `deployments.apps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _r(group: str, version: str, plural: str, kind: str, namespaced: bool, **kw: Any) -> ResourceInfo:
    kw.setdefault("singular", kind.lower())
    return ResourceInfo(group, version, plural, kind, namespaced, **kw)


BUILTIN: tuple[ResourceInfo, ...] = (
    _r(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        short_names=("ns",),
        subresources=("status", "finalize"),
        name_rule="label",
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
    ),
    _r("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=("sa",), subresources=("token",)),
    _r("", "v1", "secrets", "Secret", True),
    _r("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    _r("", "v1", "pods", "Pod", True, short_names=("po",), subresources=("status",), categories=("all",)),
    _r("", "v1", "events", "Event", True, short_names=("ev",)),
    _r(
        "",
        "v1",
        "services",
        "Service",
        True,
        short_names=("svc",),
        subresources=("status",),
        categories=("all",),
        name_rule="label",
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
    ),
    _r(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        short_names=("deploy",),
        subresources=("status",),
        categories=("all",),
        has_generation=True,
    ),
    _r(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        True,
        short_names=("rs",),
        subresources=("status",),
        categories=("all",),
        has_generation=True,
    ),
    _r(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        True,
        short_names=("sts",),
        subresources=("status",),
        categories=("all",),
        has_generation=True,
    ),
    _r(
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        True,
        short_names=("ds",),
        subresources=("status",),
        categories=("all",),
        has_generation=True,
    ),
    _r("batch", "v1", "jobs", "Job", True, subresources=("status",), categories=("all",), has_generation=True),
    _r(
        "batch",
        "v1",
        "cronjobs",
        "CronJob",
        True,
        short_names=("cj",),
        subresources=("status",),
        categories=("all",),
        has_generation=True,
    ),
    _r(
        "policy",
        "v1",
        "poddisruptionbudgets",
        "PodDisruptionBudget",
        True,
        short_names=("pdb",),
        subresources=("status",),
        has_generation=True,
    ),
    _r("coordination.k8s.io", "v1", "leases", "Lease", True),
    _r("events.k8s.io", "v1", "events", "Event", True, short_names=("ev",), storage="/events"),
    _r(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        short_names=("crd", "crds"),
        subresources=("status",),
        has_generation=True,
        unconditional_update=False,
        categories=("api-extensions",),
    ),
    _r(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
        has_generation=True,
        categories=("api-extensions",),
    ),
    _r(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        False,
        has_generation=True,
        categories=("api-extensions",),
    ),
    _r("rbac.authorization.k8s.io", "v1", "roles", "Role", True, name_rule="path"),
    _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, name_rule="path"),
    _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, name_rule="path"),
    _r("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False, name_rule="path"),
    _r("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, verbs=("create",), stored=False),
    _r(
        "authentication.k8s.io",
        "v1",
        "selfsubjectreviews",
        "SelfSubjectReview",
        False,
        verbs=("create",),
        stored=False,
    ),
    _r(
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        False,
        verbs=("create",),
        stored=False,
    ),
    _r(
        "authorization.k8s.io",
        "v1",
        "subjectaccessreviews",
        "SubjectAccessReview",
        False,
        verbs=("create",),
        stored=False,
    ),
)

# Groups in the order /apis lists them (the core group is served at /api).
_GROUP_ORDER = (
    "apps",
    "events.k8s.io",
    "batch",
    "policy",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "coordination.k8s.io",
    "rbac.authorization.k8s.io",
    "apiextensions.k8s.io",
    "admissionregistration.k8s.io",
)


def resources_from_crd(crd: dict[str, Any]) -> list[ResourceInfo]:
    """The resources a CRD serves (one per served version); [] for a CRD too malformed to serve."""
    spec = crd.get("spec")
    names = spec.get("names") if isinstance(spec, dict) else None
    if not isinstance(spec, dict) or not isinstance(names, dict) or not isinstance(spec.get("versions"), list):
        return []
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not (isinstance(group, str) and isinstance(plural, str) and isinstance(kind, str)):
        return []
    namespaced = spec.get("scope", "Namespaced") == "Namespaced"
    out = []
    for version in spec.get("versions") or []:
        if not isinstance(version, dict) or not version.get("served", True) or not version.get("name"):
            continue
        subresources = version.get("subresources")
        subresources = subresources if isinstance(subresources, dict) else {}
        subs = tuple(s for s in ("status", "scale") if s in subresources)
        out.append(
            ResourceInfo(
                group=group,
                version=str(version["name"]),
                plural=plural,
                kind=kind,
                namespaced=namespaced,
                singular=str(names.get("singular") or kind.lower()),
                short_names=tuple(names.get("shortNames") or ()),
                subresources=subs,
                categories=tuple(names.get("categories") or ()),
                has_generation=True,
                unconditional_update=False,
                custom=True,
            )
        )
    return out


def crd_schema(crd: dict[str, Any], version: str) -> dict[str, Any] | None:
    """The openAPIV3Schema of one version of a CRD, or None."""
    for v in (crd.get("spec") or {}).get("versions") or []:
        if isinstance(v, dict) and v.get("name") == version:
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            return schema if isinstance(schema, dict) else None
    return None


@dataclass
class Registry:
    """Every resource currently served; thread-safe, custom resources added and removed with their CRDs."""

    _by_gvr: dict[tuple[str, str, str], ResourceInfo] = field(default_factory=dict)
    _custom: dict[str, list[ResourceInfo]] = field(default_factory=dict)  # CRD name -> its resources
    _crds: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        for info in BUILTIN:
            self._by_gvr[(info.group, info.version, info.plural)] = info

    def lookup(self, group: str, version: str, plural: str) -> ResourceInfo | None:
        return self._by_gvr.get((group, version, plural))

    def set_crd(self, crd: dict[str, Any]) -> None:
        """Serve (or re-serve, after an update) the resources of a CRD."""
        name = crd["metadata"]["name"]
        with self._lock:
            self._drop(name)
            infos = resources_from_crd(crd)
            for info in infos:
                key = (info.group, info.version, info.plural)
                if key in self._by_gvr and not self._by_gvr[key].custom:
                    continue  # a CRD may not shadow a built-in resource
                self._by_gvr[key] = info
            self._custom[name] = infos
            self._crds[name] = crd

    def remove_crd(self, name: str) -> None:
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        for info in self._custom.pop(name, []):
            key = (info.group, info.version, info.plural)
            if self._by_gvr.get(key) == info:
                del self._by_gvr[key]
        self._crds.pop(name, None)

    def crd_for(self, info: ResourceInfo) -> dict[str, Any] | None:
        return self._crds.get(f"{info.plural}.{info.group}")

    def all(self) -> list[ResourceInfo]:
        with self._lock:
            return list(self._by_gvr.values())

    # Discovery documents -------------------------------------------------------------------------

    def group_versions(self) -> dict[str, list[str]]:
        """group -> versions, built-ins first in a stable order, then custom groups."""
        out: dict[str, list[str]] = {}
        infos = self.all()
        for group in ("", *_GROUP_ORDER):
            for info in infos:
                if info.group == group and not info.custom and info.version not in out.setdefault(group, []):
                    out[group].append(info.version)
        for info in infos:
            if info.version not in out.setdefault(info.group, []):
                out[info.group].append(info.version)
        return out

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        """The APIResourceList of /api/v1 or /apis/G/V, or None if that group/version is not served."""
        infos = [i for i in self.all() if i.group == group and i.version == version]
        if not infos:
            return None
        resources = []
        for info in infos:
            entry: dict[str, Any] = {
                "name": info.plural,
                "singularName": info.singular,
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": list(info.verbs),
            }
            if info.short_names:
                entry["shortNames"] = list(info.short_names)
            if info.categories:
                entry["categories"] = list(info.categories)
            resources.append(entry)
            for sub in info.subresources:
                sub_entry: dict[str, Any] = {
                    "name": f"{info.plural}/{sub}",
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": list(READ_WRITE_STATUS),
                }
                if sub == "token":
                    sub_entry.update(group="authentication.k8s.io", version="v1", kind="TokenRequest", verbs=["create"])
                elif sub == "finalize":
                    sub_entry["verbs"] = ["update"]
                elif sub == "scale":
                    sub_entry.update(group="autoscaling", version="v1", kind="Scale")
                resources.append(sub_entry)
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.group_versions().get(group)
        if not group or not versions:
            return None
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = []
        for group in self.group_versions():
            if group:
                doc = self.api_group(group)
                if doc:
                    doc.pop("kind")
                    doc.pop("apiVersion")
                    groups.append(doc)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
