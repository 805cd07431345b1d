"""The API semantics of the in-memory cluster, without HTTP: create/get/list/update/patch/delete/watch.

Metadata management (uid, generateName, resourceVersion, generation), the status subresource, finalizers,
validation and mutating admission live here; background behaviour (garbage collection, namespace deletion,
the token controller) is in controllers.py and reacts to the store's events.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kubemcsa_testing import errors, patch, selectors, validation
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.resources import Registry, ResourceInfo, crd_schema
from kubemcsa_testing.store import DEFAULT_HISTORY, Obj, Store, Watcher

SA_TOKEN_TYPE = "kubernetes.io/service-account-token"
SA_NAME_ANNOTATION = "kubernetes.io/service-account.name"
SA_UID_ANNOTATION = "kubernetes.io/service-account.uid"
ROOT_CA_CONFIGMAP = "kube-root-ca.crt"
SA_MOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # kube's utilrand alphabet (no vowels, no ambiguous digits)
_SERVER_MANAGED = (
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
)
# Field selectors kube supports beyond metadata.name/namespace, per storage.
_EXTRA_FIELDS: dict[str, tuple[str, ...]] = {
    "/secrets": ("type",),
    "/pods": ("spec.nodeName", "spec.serviceAccountName", "status.phase", "spec.restartPolicy", "spec.schedulerName"),
    "/events": (
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ),
    "/namespaces": ("status.phase",),
}
# events.k8s.io/v1 field -> core/v1 field (same storage, converted on the way in and out).
_EVENT_FIELDS = {
    "regarding": "involvedObject",
    "note": "message",
    "deprecatedSource": "source",
    "deprecatedFirstTimestamp": "firstTimestamp",
    "deprecatedLastTimestamp": "lastTimestamp",
    "deprecatedCount": "count",
    "reportingController": "reportingComponent",
}


def now_rfc3339(timestamp: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if timestamp is None else timestamp))


def random_uuid() -> str:
    """A random (version 4) UUID, for object uids and Audit-Ids: they name things, they guard nothing, so they come
    from the interpreter's generator, not a system call each (which also lets other threads take the interpreter)."""
    return str(uuid.UUID(int=random.getrandbits(128), version=4))


def random_suffix(length: int = 5) -> str:
    return "".join(secrets.choice(_NAME_CHARS) for _ in range(length))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _meta(obj: Obj) -> dict[str, Any]:
    return obj.setdefault("metadata", {})


def _without(obj: Obj, *keys: str) -> Obj:
    return {k: v for k, v in obj.items() if k not in keys}


def _semantic_meta(obj: Obj) -> Obj:
    meta = dict(obj.get("metadata") or {})
    meta.pop("resourceVersion", None)
    meta.pop("managedFields", None)
    return {**obj, "metadata": meta}


def event_to_core(obj: Obj) -> Obj:
    out = {_EVENT_FIELDS.get(k, k): v for k, v in obj.items()}
    out["apiVersion"], out["kind"] = "v1", "Event"
    return out


def event_from_core(obj: Obj) -> Obj:
    back = {v: k for k, v in _EVENT_FIELDS.items()}
    out = {back.get(k, k): v for k, v in obj.items()}
    out["apiVersion"], out["kind"] = "events.k8s.io/v1", "Event"
    return out


class Cluster:
    """One cluster's objects and the rules kube-apiserver applies to them."""

    def __init__(self, name: str, ca_pem: bytes, history_size: int = DEFAULT_HISTORY) -> None:
        self.name = name
        self.ca_pem = ca_pem
        self.store = Store(history_size)
        self.registry = Registry()
        # Mutating admission: set by the server once admission.py is available; (info, attrs...) -> object.
        self.admit: Callable[..., Obj] | None = None
        # Authorization that depends on the object written (RBAC escalation checks): (info, obj, user) -> None.
        self.check_write: Callable[[ResourceInfo, Obj, Any], None] | None = None
        self._service_ip = 10
        self._ip_lock = threading.Lock()

    # Presentation ---------------------------------------------------------------------------------

    def present(self, info: ResourceInfo, obj: Obj) -> Obj:
        """The stored object as `info`'s version shows it (stored objects are never modified)."""
        if info.storage == "/events":
            return event_from_core(obj)
        if obj.get("apiVersion") != info.api_version or obj.get("kind") != info.kind:
            return {**obj, "apiVersion": info.api_version, "kind": info.kind}
        return obj

    def _to_storage(self, info: ResourceInfo, obj: Obj) -> Obj:
        if info.storage == "/events":
            return event_to_core(obj)
        return obj

    def info_for_storage(self, storage_key: str) -> ResourceInfo | None:
        group, _, plural = storage_key.partition("/")
        for info in self.registry.all():
            if info.group == group and info.plural == plural and not info.storage:
                return info
        return None

    # Reads ----------------------------------------------------------------------------------------

    def get(self, info: ResourceInfo, namespace: str, name: str) -> Obj:
        obj = self.store.get(info.storage_key, namespace, name)
        if obj is None:
            raise errors.not_found(info.plural, name, info.group)
        return self.present(info, obj)

    def find(self, info: ResourceInfo, namespace: str, name: str) -> Obj | None:
        return self.store.get(info.storage_key, namespace, name)

    def matcher(
        self, info: ResourceInfo, label_selector: str | None, field_selector: str | None
    ) -> Callable[[Obj], bool]:
        labels = selectors.parse_label_selector(label_selector)
        fields = selectors.parse_field_selector(field_selector, _EXTRA_FIELDS.get(info.storage_key, ()))
        return lambda obj: labels(obj["metadata"].get("labels") or {}) and fields(obj)

    def list(
        self,
        info: ResourceInfo,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> Obj:
        """A List; with `limit`, a page and a `continue` token for the next one (items in namespace/name order)."""
        matches = self.matcher(info, label_selector, field_selector)
        pins = selectors.field_selector_pins(field_selector)
        if "name" in pins and (namespace is not None or not info.namespaced):
            one = self.store.get(info.storage_key, namespace or "", pins["name"])
            with self.store.lock:
                objs, rv = ([one] if one is not None else []), self.store.resource_version
        else:
            objs, rv = self.store.list(info.storage_key, namespace if info.namespaced else None)
        items = [self.present(info, obj) for obj in objs if matches(obj)]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if continue_token:
            rv, after = _decode_continue(continue_token)
            meta["resourceVersion"] = str(rv)
            items = [i for i in items if _sort_key(i) > after]
        if limit and limit > 0 and len(items) > limit:
            meta["continue"] = _encode_continue(rv, _sort_key(items[limit - 1]))
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": info.list_kind, "apiVersion": info.api_version, "metadata": meta, "items": items}

    def watch(
        self,
        info: ResourceInfo,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
        resource_version: str | None,
    ) -> Watcher:
        matches = self.matcher(info, label_selector, field_selector)
        since: int | None = None
        if resource_version not in (None, "", "0"):
            try:
                since = int(resource_version)
            except ValueError:
                raise errors.bad_request(f"invalid resource version: {resource_version!r}") from None
        return self.store.watch(info, namespace if info.namespaced else None, matches, since)

    # Creates --------------------------------------------------------------------------------------

    def _check_decodable(self, info: ResourceInfo, obj: Obj) -> None:
        """Fields kube decodes into typed values fail decoding with 400, before any validation (Secret data)."""
        if info.group == "" and info.plural == "secrets":
            data = obj.get("data")
            for value in data.values() if isinstance(data, dict) else ():
                if not isinstance(value, str):
                    continue
                try:
                    base64.b64decode(value, validate=True)
                except ValueError:
                    offset = next((i for i, c in enumerate(value) if c not in _B64_ALPHABET), len(value))
                    raise errors.bad_request(
                        f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at input byte '
                        f"{offset}"
                    ) from None

    def _check_type(self, info: ResourceInfo, body: Any, owned: bool = False) -> Obj:
        """The body as an object of `info`'s kind: a copy, unless `owned` (the caller hands it over: a request's
        freshly decoded body, which nothing else holds)."""
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body must be a {info.kind} object, got {type(body).__name__}")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != info.api_version:
            raise errors.bad_request(
                f"the API version in the data ({api_version}) does not match the expected API version "
                f"({info.api_version})"
            )
        if kind and kind != info.kind:
            raise errors.bad_request(
                f"the object provided is unrecognized (must be of type {info.kind}): kind {kind!r} was given"
            )
        if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
            raise errors.bad_request("metadata must be an object")
        obj = body if owned else copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = info.api_version, info.kind
        if obj.get("metadata") is None:
            obj["metadata"] = {}
        for key in ("name", "namespace", "generateName", "resourceVersion", "uid"):
            value = obj["metadata"].get(key)
            if value is not None and not isinstance(value, str):
                raise errors.bad_request(
                    f"{info.kind} in version {info.version!r} cannot be handled as a {info.kind}: "
                    f"metadata.{key} must be a string"
                )
        self._check_decodable(info, obj)
        return obj

    def _check_namespace(self, info: ResourceInfo, obj: Obj, namespace: str) -> None:
        meta = _meta(obj)
        if not info.namespaced:
            meta.pop("namespace", None)
            return
        if meta.get("namespace") and meta["namespace"] != namespace:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )
        meta["namespace"] = namespace

    def _require_namespace(self, info: ResourceInfo, namespace: str, name: str) -> None:
        if not info.namespaced:
            return
        ns = self.store.get("/namespaces", "", namespace)
        if ns is None:
            raise errors.not_found("namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise StatusError(
                403,
                "Forbidden",
                f'{info.qualified()} "{name}" is forbidden: unable to create new content in '
                f"namespace {namespace} because it is being terminated",
                {"name": name, "kind": info.plural, **({"group": info.group} if info.group else {})},
            )

    def _invalid(self, info: ResourceInfo, name: str, causes: list[tuple[str, str]]) -> StatusError:
        return errors.invalid(info.kind, name, causes, info.group)

    def _validate(self, info: ResourceInfo, obj: Obj, old: Obj | None = None) -> None:
        causes = validation.object_causes(obj, info)
        if info.custom:
            crd = self.registry.crd_for(info)
            schema = crd_schema(crd, info.version) if crd else None
            if schema:
                body = _without(obj, "metadata", "apiVersion", "kind")
                causes += validation.schema_causes(body, schema)
                if not causes:  # as kube: CEL rules run on objects that pass the structural schema
                    previous = _without(old, "metadata", "apiVersion", "kind") if old is not None else None
                    causes += validation.rule_causes(body, schema, old=previous)
        if causes:
            raise self._invalid(info, str(_meta(obj).get("name") or ""), causes)

    def _check_strict(self, info: ResourceInfo, obj: Obj, strict: bool) -> None:
        """fieldValidation=Strict: a custom resource's unknown fields are an error instead of being pruned."""
        if not strict or not info.custom:
            return
        crd = self.registry.crd_for(info)
        schema = crd_schema(crd, info.version) if crd else None
        unknown = validation.unknown_fields(obj, schema)
        if unknown:
            fields = ", ".join(f'unknown field "{path}"' for path in unknown)
            raise errors.bad_request(f"strict decoding error: {fields}")

    def _prune(self, info: ResourceInfo, obj: Obj) -> Obj:
        if not info.custom:
            return obj
        crd = self.registry.crd_for(info)
        schema = crd_schema(crd, info.version) if crd else None
        return validation.prune(obj, schema) if schema else obj

    def create(
        self,
        info: ResourceInfo,
        namespace: str,
        body: Any,
        *,
        user: Any = None,
        dry_run: bool = False,
        admit: bool = True,
        strict: bool = False,
        owned: bool = False,
    ) -> Obj:
        """`owned`: the body is handed over (see _check_type) and may be stored as it is."""
        if not info.stored:
            raise errors.method_not_allowed()
        obj = self._check_type(info, body, owned)
        self._check_namespace(info, obj, namespace)
        meta = _meta(obj)
        for key in (*_SERVER_MANAGED, "managedFields"):
            meta.pop(key, None)
        if info.has_status and info.plural != "namespaces":
            obj.pop("status", None)
        self._check_strict(info, obj, strict)
        obj = self._prune(info, obj)
        self._default(info, obj)
        self._require_namespace(info, namespace, str(meta.get("name") or ""))
        # As in kube: mutating admission (the ServiceAccount plugin, then webhooks) sees the object before its
        # name is generated and before it is validated; only its metadata is checked first.
        causes = validation.metadata_causes(obj, info)
        if causes:
            raise self._invalid(info, str(meta.get("name") or ""), causes)
        if self.check_write is not None and user is not None:
            self.check_write(info, obj, user)
        if info.group == "" and info.plural == "pods":
            self._service_account_admission(obj, namespace)
        if admit and self.admit is not None:
            admitted = self.admit(info, "CREATE", obj, None, namespace, user, dry_run, "")
            if admitted is not obj:  # a webhook's object is checked again; the same one (no webhook) already was
                obj = self._check_type(info, admitted)
                self._check_namespace(info, obj, namespace)
            if info.group == "" and info.plural == "pods":
                # kube decodes a webhook's patched object with defaulting: what it added is defaulted too.
                _default_pod_volumes(_dict(obj.get("spec")))
        meta = _meta(obj)
        if not meta.get("name") and isinstance(meta.get("generateName"), str) and meta["generateName"]:
            meta["name"] = meta["generateName"] + random_suffix()
        self._validate(info, obj)
        meta["uid"] = random_uuid()
        meta["creationTimestamp"] = now_rfc3339()
        if info.has_generation:
            meta["generation"] = 1
        if info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
            obj["status"] = _crd_status(obj)
        if dry_run:
            return self.present(info, obj)
        stored = self.store.create(info, self._to_storage(info, obj))
        self._after_write(info, stored)
        return self.present(info, stored)

    def _default(self, info: ResourceInfo, obj: Obj) -> None:
        """The defaults kube-apiserver fills in that clients look at."""
        meta = _meta(obj)
        if info.group != "":
            if info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
                names = _dict(obj.get("spec")).get("names")
                if isinstance(names, dict) and isinstance(names.get("kind"), str) and names["kind"]:
                    names.setdefault("listKind", names["kind"] + "List")
                    names.setdefault("singular", str(names["kind"]).lower())
                if isinstance(obj.get("spec"), dict):
                    obj["spec"].setdefault("scope", "Namespaced")
            if info.plural == "deployments" and isinstance(obj.get("spec"), dict):
                obj["spec"].setdefault("replicas", 1)
            return
        if info.plural == "namespaces":
            meta.setdefault("labels", {})
            if isinstance(meta["labels"], dict) and isinstance(meta.get("name"), str):
                meta["labels"]["kubernetes.io/metadata.name"] = meta["name"]
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif info.plural == "secrets":
            obj.setdefault("type", "Opaque")
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict) and all(isinstance(v, str) for v in string_data.values()):
                data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
                for key, value in string_data.items():
                    data[key] = base64.b64encode(value.encode()).decode()
                obj["data"] = data
            elif string_data is not None:
                obj["stringData"] = string_data  # left for validation to reject
        elif info.plural == "pods":
            spec = obj.get("spec")
            if isinstance(spec, dict):
                spec.setdefault("restartPolicy", "Always")
                spec.setdefault("dnsPolicy", "ClusterFirst")
                spec.setdefault("schedulerName", "default-scheduler")
                spec.setdefault("terminationGracePeriodSeconds", 30)
                spec.setdefault("enableServiceLinks", True)
                _default_pod_volumes(spec)
                for kind in ("containers", "initContainers"):
                    for c in _list(spec.get(kind)):
                        if isinstance(c, dict):
                            c.setdefault("terminationMessagePath", "/dev/termination-log")
                            c.setdefault("terminationMessagePolicy", "File")
                            image = str(c.get("image") or "")
                            latest = ":" not in image.rpartition("/")[2] or image.endswith(":latest")
                            c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif info.plural == "services":
            spec = obj.get("spec")
            if isinstance(spec, dict):
                spec.setdefault("type", "ClusterIP")
                spec.setdefault("sessionAffinity", "None")
                if spec.get("clusterIP") != "None" and not spec.get("clusterIP"):
                    with self._ip_lock:
                        self._service_ip += 1
                        n = self._service_ip
                    spec["clusterIP"] = f"10.96.{n // 250}.{n % 250 + 1}"
                    spec["clusterIPs"] = [spec["clusterIP"]]
                for port in _list(spec.get("ports")):
                    if isinstance(port, dict):
                        port.setdefault("protocol", "TCP")
                        port.setdefault("targetPort", port.get("port"))
            obj["status"] = {"loadBalancer": {}}

    def _service_account_admission(self, pod: Obj, namespace: str) -> None:
        """The ServiceAccount admission plugin: default the SA, require it, mount its projected token."""
        spec = pod.get("spec")
        if not isinstance(spec, dict):
            return
        sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if not isinstance(sa_name, str):
            raise self._invalid(
                self.registry.lookup("", "v1", "pods"),  # type: ignore[arg-type]
                str(_meta(pod).get("name") or ""),
                [("spec.serviceAccountName", f"Invalid value: {json.dumps(sa_name)}: must be a string")],
            )
        spec["serviceAccountName"] = spec["serviceAccount"] = sa_name
        sa = self.store.get("/serviceaccounts", namespace, sa_name)
        pod_name = _meta(pod).get("name") or ""
        if sa is None:
            raise StatusError(
                403,
                "Forbidden",
                f'pods "{pod_name}" is forbidden: error looking up service account {namespace}/{sa_name}: '
                f'serviceaccount "{sa_name}" not found',
                {"name": pod_name, "kind": "pods"},
            )
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = sa.get("automountServiceAccountToken", True)
        if not automount:
            return
        containers = [
            c for kind in ("initContainers", "containers") for c in _list(spec.get(kind)) if isinstance(c, dict)
        ]
        if any(_dict(m).get("mountPath") == SA_MOUNT_PATH for c in containers for m in _list(c.get("volumeMounts"))):
            return
        malformed = spec.get("volumes") is not None and not isinstance(spec["volumes"], list)
        if malformed or any(c.get("volumeMounts") is not None and not isinstance(c["volumeMounts"], list)
                            for c in containers):  # fmt: skip
            return  # validation refuses the pod; do not paper over it
        volume_name = f"kube-api-access-{random_suffix()}"
        if not isinstance(spec.get("volumes"), list):
            spec["volumes"] = []
        spec["volumes"].append(
            {
                "name": volume_name,
                "projected": {
                    "defaultMode": 420,
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                                    }
                                ]
                            }
                        },
                    ],
                },
            }
        )
        for c in containers:
            if not isinstance(c.get("volumeMounts"), list):
                c["volumeMounts"] = []
            c["volumeMounts"].append({"name": volume_name, "readOnly": True, "mountPath": SA_MOUNT_PATH})

    # Updates --------------------------------------------------------------------------------------

    def update(
        self,
        info: ResourceInfo,
        namespace: str,
        name: str,
        body: Any,
        *,
        subresource: str = "",
        user: Any = None,
        dry_run: bool = False,
        admit: bool = True,
        current: Obj | None = None,
        strict: bool = False,
        owned: bool = False,
    ) -> Obj:
        """PUT; `current` (for patches) is the object the body was computed from; `owned` as for create."""
        obj = self._check_type(info, body, owned)
        self._check_strict(info, obj, strict)
        meta = _meta(obj)
        if meta.get("name") and meta["name"] != name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        meta["name"] = name
        self._check_namespace(info, obj, namespace)
        # Only an unconditional PUT goes round again (on a concurrent write), and it must start from the body as
        # sent; otherwise the one pass may build the new object from the body itself (ours: see _check_type).
        may_retry = not meta.get("resourceVersion") and current is None
        for _attempt in range(10):
            old = (
                current
                if current is not None
                else self.store.get(info.storage_key, namespace if info.namespaced else "", name)
            )
            if old is None:
                raise errors.not_found(info.plural, name, info.group)
            old = self.present(info, old)
            requested_rv = meta.get("resourceVersion")
            if requested_rv:
                if requested_rv != old["metadata"]["resourceVersion"]:
                    raise errors.conflict(info.plural, name, info.group)
            elif not info.unconditional_update and current is None:
                raise self._invalid(
                    info, name, [("metadata.resourceVersion", "Invalid value: 0x0: must be specified for an update")]
                )
            new = self._merge_update(info, old, obj, subresource, reuse_body=not may_retry)
            if _semantic_meta(new) == _semantic_meta(old):
                return old  # nothing changed: no write, no event, same resourceVersion (as kube)
            causes = validation.metadata_causes(new, info)
            if causes:
                raise self._invalid(info, name, causes)
            if self.check_write is not None and user is not None and subresource == "":
                self.check_write(info, new, user)
            if admit and self.admit is not None and subresource == "":
                admitted = self.admit(info, "UPDATE", new, old, namespace, user, dry_run, subresource)
                if admitted is not new:  # as in create: only a webhook's object needs checking again
                    new = self._check_type(info, admitted)
            self._validate(info, new, old)
            self._finish_update(info, old, new)
            if dry_run:
                return new
            try:
                stored = self.store.update(info, self._to_storage(info, new), old["metadata"]["resourceVersion"])
            except StatusError as exc:
                if exc.reason == "Conflict" and not requested_rv and current is None:
                    continue  # an unconditional update retries on a concurrent write, as kube does
                raise
            self._after_write(info, stored)
            meta_now = stored["metadata"]
            namespace_held = info.plural == "namespaces" and (stored.get("spec") or {}).get("finalizers")
            if meta_now.get("deletionTimestamp") and not meta_now.get("finalizers") and not namespace_held:
                # The last finalizer is gone: the deletion completes (MODIFIED, then DELETED, as in kube).
                gone = self.store.delete(info, namespace if info.namespaced else "", name)
                self._after_delete(info, gone)
                return self.present(info, gone)
            return self.present(info, stored)
        raise errors.conflict(info.plural, name, info.group)

    def _merge_update(self, info: ResourceInfo, old: Obj, obj: Obj, subresource: str, reuse_body: bool = False) -> Obj:
        """The object an update stores: server-managed metadata kept, status or main part kept as the rules say.

        `obj` is the update's own copy of the body (never a stored object); with `reuse_body` it is not needed
        again and the new object is built from it in place. What the new object takes from `old` (a stored,
        never modified object) is shared, not copied: nothing below modifies it in place, only replaces it.
        """
        if subresource == "status":
            new = {**old, "metadata": dict(old["metadata"])}
            if "status" in obj:
                new["status"] = obj["status"] if reuse_body else copy.deepcopy(obj["status"])
            else:
                new.pop("status", None)
            return self._prune(info, new)
        if subresource == "finalize" and info.plural == "namespaces":
            new = copy.deepcopy(old)
            new["spec"] = {
                **(old.get("spec") or {}),
                "finalizers": list((obj.get("spec") or {}).get("finalizers") or []),
            }
            return new
        new = obj if reuse_body else copy.deepcopy(obj)
        meta = _meta(new)
        old_meta = old["metadata"]
        for key in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation"):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        meta.pop("selfLink", None)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if "managedFields" not in meta and "managedFields" in old_meta:
            meta["managedFields"] = old_meta["managedFields"]
        if info.has_status:
            if "status" in old:
                new["status"] = old["status"]
            else:
                new.pop("status", None)
        if info.group == "" and info.plural == "secrets":
            self._default(info, new)
        if info.plural == "namespaces" and info.group == "":
            new["spec"] = copy.deepcopy(old.get("spec") or {})
            labels = meta.setdefault("labels", {})
            if isinstance(labels, dict):
                labels["kubernetes.io/metadata.name"] = meta["name"]
        return self._prune(info, new)

    def _finish_update(self, info: ResourceInfo, old: Obj, new: Obj) -> None:
        meta, old_meta = new["metadata"], old["metadata"]
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise self._invalid(
                    info,
                    meta["name"],
                    [
                        (
                            "metadata.finalizers",
                            "Forbidden: no new finalizers can be added if the object is being deleted",
                        )
                    ],
                )
        if info.group == "" and info.plural in ("secrets", "configmaps"):
            causes = []
            if info.plural == "secrets" and new.get("type") != old.get("type"):
                causes.append(("type", f"Invalid value: {json.dumps(new.get('type'))}: field is immutable"))
            if old.get("immutable") is True:
                for key in ("data", "binaryData"):
                    if new.get(key) != old.get(key):
                        causes.append((key, "Forbidden: field is immutable when `immutable` is set"))
                if new.get("immutable") is not True:
                    causes.append(("immutable", "Forbidden: field is immutable when `immutable` is set"))
            if causes:
                raise self._invalid(info, meta["name"], causes)
        if info.has_generation:
            skip = ("metadata", "status") if info.has_status else ("metadata",)
            if _without(new, *skip) != _without(old, *skip):
                meta["generation"] = int(old_meta.get("generation") or 1) + 1
        if info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
            new["status"] = _crd_status(new)

    def patch(
        self,
        info: ResourceInfo,
        namespace: str,
        name: str,
        content_type: str,
        patch_body: Any,
        *,
        subresource: str = "",
        user: Any = None,
        dry_run: bool = False,
        strict: bool = False,
    ) -> Obj:
        if content_type == patch.STRATEGIC_PATCH and info.custom:
            raise StatusError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            )
        for _attempt in range(10):
            current = self.store.get(info.storage_key, namespace if info.namespaced else "", name)
            if current is None:
                raise errors.not_found(info.plural, name, info.group)
            current = self.present(info, current)
            patched = patch.apply_patch(content_type, current, patch_body)
            if not isinstance(patched, dict):
                raise errors.bad_request("the patch produced something that is not an object")
            if patched.get("metadata") is not None and not isinstance(patched["metadata"], dict):
                raise errors.bad_request(f"{info.kind}.metadata must be an object")
            patched_rv = (patched.get("metadata") or {}).get("resourceVersion")
            if patched_rv and patched_rv != current["metadata"]["resourceVersion"]:
                raise errors.conflict(info.plural, name, info.group)
            patched.setdefault("metadata", {})
            if isinstance(patched["metadata"], dict):
                patched["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                return self.update(
                    info,
                    namespace,
                    name,
                    patched,
                    subresource=subresource,
                    user=user,
                    dry_run=dry_run,
                    current=current,
                    strict=strict,
                )
            except StatusError as exc:
                if exc.reason == "Conflict" and not (
                    isinstance(patch_body, dict) and (patch_body.get("metadata") or {}).get("resourceVersion")
                ):
                    continue
                raise
        raise errors.conflict(info.plural, name, info.group)

    # Deletes --------------------------------------------------------------------------------------

    def delete(
        self,
        info: ResourceInfo,
        namespace: str,
        name: str,
        options: Obj | None = None,
        *,
        dry_run: bool = False,
    ) -> tuple[int, Obj]:
        """(HTTP code, body): 200 with the removed object, or 202 with it marked for deletion (finalizers)."""
        options = options or {}
        ns = namespace if info.namespaced else ""
        with self.store.lock:
            current = self.store.get(info.storage_key, ns, name)
            if current is None:
                raise errors.not_found(info.plural, name, info.group)
            preconditions = options.get("preconditions") or {}
            if preconditions.get("uid") and preconditions["uid"] != current["metadata"].get("uid"):
                raise StatusError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {info.qualified()} "{name}": Precondition failed: UID in '
                    f"precondition: {preconditions['uid']}, UID in object meta: {current['metadata'].get('uid')}",
                    {"name": name, "kind": info.plural, **({"group": info.group} if info.group else {})},
                )
            if (
                preconditions.get("resourceVersion")
                and preconditions["resourceVersion"] != current["metadata"]["resourceVersion"]
            ):
                raise StatusError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {info.qualified()} "{name}": Precondition failed: '
                    f"ResourceVersion in precondition: {preconditions['resourceVersion']}, ResourceVersion in "
                    f"object meta: {current['metadata']['resourceVersion']}",
                    {"name": name, "kind": info.plural, **({"group": info.group} if info.group else {})},
                )
            policy = options.get("propagationPolicy")
            if policy is None and options.get("orphanDependents") is True:
                policy = "Orphan"
            finalizers = list(current["metadata"].get("finalizers") or [])
            if policy == "Orphan" and "orphan" not in finalizers:
                finalizers.append("orphan")
            elif policy == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            namespace_pending = info.plural == "namespaces" and info.group == ""
            if dry_run:
                return 200, self.present(info, current)
            if finalizers or namespace_pending:
                if current["metadata"].get("deletionTimestamp"):
                    return 202 if not namespace_pending else 200, self.present(info, current)
                new = copy.deepcopy(current)
                new["metadata"]["deletionTimestamp"] = now_rfc3339()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                if finalizers:
                    new["metadata"]["finalizers"] = finalizers
                if namespace_pending:
                    new["status"] = {"phase": "Terminating"}
                stored = self.store.update(info, new, current["metadata"]["resourceVersion"])
                return (200 if namespace_pending else 202), self.present(info, stored)
            gone = self.store.delete(info, ns, name)
        self._after_delete(info, gone)
        return 200, self.present(info, gone)

    def remove(self, info: ResourceInfo, namespace: str, name: str) -> None:
        """Remove an object now, ignoring finalizers (controllers finishing a deletion); no error if absent."""
        try:
            gone = self.store.delete(info, namespace if info.namespaced else "", name)
        except StatusError:
            return
        self._after_delete(info, gone)

    # Hooks on writes ------------------------------------------------------------------------------

    def _after_write(self, info: ResourceInfo, stored: Obj) -> None:
        if info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
            self.registry.set_crd(stored)
        if info.plural == "namespaces" and info.group == "" and stored["metadata"]["resourceVersion"]:
            self.ensure_namespace_defaults(stored["metadata"]["name"])

    def _after_delete(self, info: ResourceInfo, gone: Obj) -> None:
        if info.plural == "customresourcedefinitions" and info.group == "apiextensions.k8s.io":
            spec = gone.get("spec") or {}
            plural, group = (spec.get("names") or {}).get("plural"), spec.get("group")
            self.registry.remove_crd(gone["metadata"]["name"])
            if plural and group:
                self.store.drop_storage(f"{group}/{plural}")

    def ensure_namespace_defaults(self, namespace: str) -> None:
        """The `default` ServiceAccount and the `kube-root-ca.crt` ConfigMap every active namespace has."""
        ns = self.store.get("/namespaces", "", namespace)
        if ns is None or ns["metadata"].get("deletionTimestamp"):
            return
        sa_info = self.registry.lookup("", "v1", "serviceaccounts")
        cm_info = self.registry.lookup("", "v1", "configmaps")
        assert sa_info is not None and cm_info is not None
        if self.store.get(sa_info.storage_key, namespace, "default") is None:
            with contextlib.suppress(StatusError):  # created concurrently
                self.create(sa_info, namespace, {"metadata": {"name": "default"}}, admit=False)
        if self.store.get(cm_info.storage_key, namespace, ROOT_CA_CONFIGMAP) is None:
            body = {
                "metadata": {
                    "name": ROOT_CA_CONFIGMAP,
                    "annotations": {
                        "kubernetes.io/description": "Contains a CA bundle that can be used to verify "
                        "the kube-apiserver when using internal endpoints such as the internal service "
                        "IP or kubernetes.default.svc. No other usage is guaranteed across "
                        "distributions of Kubernetes clusters."
                    },
                },
                "data": {"ca.crt": self.ca_pem.decode()},
            }
            with contextlib.suppress(StatusError):
                self.create(cm_info, namespace, body, admit=False)

    def bootstrap(self, cluster_roles: list[Obj], cluster_role_bindings: list[Obj]) -> None:
        """A fresh cluster: the four default namespaces and the default RBAC objects."""
        ns_info = self.registry.lookup("", "v1", "namespaces")
        cr_info = self.registry.lookup("rbac.authorization.k8s.io", "v1", "clusterroles")
        crb_info = self.registry.lookup("rbac.authorization.k8s.io", "v1", "clusterrolebindings")
        assert ns_info is not None and cr_info is not None and crb_info is not None
        for name in DEFAULT_NAMESPACES:
            if self.store.get("/namespaces", "", name) is None:
                self.create(ns_info, "", {"metadata": {"name": name}}, admit=False)
        for info, objs in ((cr_info, cluster_roles), (crb_info, cluster_role_bindings)):
            for obj in objs:
                if self.store.get(info.storage_key, "", obj["metadata"]["name"]) is None:
                    self.create(info, "", obj, admit=False)


def _sort_key(obj: Obj) -> list[str]:
    return [obj["metadata"].get("namespace", ""), obj["metadata"]["name"]]


def _encode_continue(rv: int, after: list[str]) -> str:
    raw = json.dumps({"rv": rv, "start": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, list[str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        rv, after = int(data["rv"]), [str(x) for x in data["start"]]
    except (ValueError, KeyError, TypeError):
        raise errors.bad_request("continue key is not valid: use the continue token of the previous page") from None
    if len(after) != 2:
        raise errors.bad_request("continue key is not valid: use the continue token of the previous page")
    return rv, after


def _crd_status(crd: Obj) -> Obj:
    """A CRD's status once established (the in-memory server accepts names at once).

    storedVersions keeps every version ever used for storage, as kube does, until someone edits the status.
    """
    status = _dict(crd.get("status"))
    names = dict(_dict(_dict(crd.get("spec")).get("names")))
    conditions = _list(status.get("conditions"))
    stamp = _dict(conditions[0] if conditions else None).get("lastTransitionTime") or now_rfc3339()
    storage = [str(v.get("name")) for v in _list(_dict(crd.get("spec")).get("versions")) if _dict(v).get("storage")]
    stored = [v for v in _list(status.get("storedVersions")) if isinstance(v, str)]
    storage = stored + [v for v in storage if v not in stored]
    return {
        "acceptedNames": names,
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "lastTransitionTime": stamp,
                "reason": "NoConflicts",
                "message": "no conflicts found",
            },
            {
                "type": "Established",
                "status": "True",
                "lastTransitionTime": stamp,
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
            },
        ],
        "storedVersions": storage,
    }


def _default_pod_volumes(spec: Obj) -> None:
    """What kube-apiserver (seen on v1.36) defaults in a pod's volumes: defaultMode 0644 (420) on secret,
    configMap, projected and downwardAPI volumes, a projected token's expirationSeconds (3600), and a downward
    API fieldRef's apiVersion (v1)."""
    for volume in _list(spec.get("volumes")):
        if not isinstance(volume, dict):
            continue
        for kind in ("secret", "configMap", "projected", "downwardAPI"):
            if isinstance(volume.get(kind), dict):
                volume[kind].setdefault("defaultMode", 420)
        downward = [_dict(volume.get("downwardAPI"))]
        for source in _list(_dict(volume.get("projected")).get("sources")):
            if isinstance(source, dict) and isinstance(source.get("serviceAccountToken"), dict):
                source["serviceAccountToken"].setdefault("expirationSeconds", 3600)
            if isinstance(source, dict):
                downward.append(_dict(source.get("downwardAPI")))
        for item in (item for d in downward for item in _list(d.get("items"))):
            if isinstance(item, dict) and isinstance(item.get("fieldRef"), dict):
                item["fieldRef"].setdefault("apiVersion", "v1")
