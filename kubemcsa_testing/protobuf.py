"""Decoding of the Kubernetes protobuf request bodies kubectl's imperative commands send (pure functions).

`kubectl create namespace|secret|configmap|serviceaccount|token|role|rolebinding` and `kubectl auth can-i`
send `application/vnd.kubernetes.protobuf`: the magic `k8s\\0`, then a runtime.Unknown wrapping the object.
Only the kinds those commands send are described; anything else is 415, as a server without protobuf would
answer. Answers are always JSON, which clients accept.
"""

from __future__ import annotations

import base64
from typing import Any

from kubemcsa_testing.errors import StatusError

CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

# A message schema: field number -> (JSON name, type). Types: "string", "bytes", "int", "bool", "smap" (map of
# strings), "bmap" (map of bytes), a nested schema dict, or a one-item list of any of these for repeated fields.
Schema = dict[int, tuple[str, Any]]

OWNER_REFERENCE: Schema = {
    1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"), 5: ("apiVersion", "string"),
    6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool"),
}  # fmt: skip
OBJECT_META: Schema = {
    1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"), 5: ("uid", "string"),
    6: ("resourceVersion", "string"), 7: ("generation", "int"), 11: ("labels", "smap"), 12: ("annotations", "smap"),
    13: ("ownerReferences", [OWNER_REFERENCE]), 14: ("finalizers", ["string"]),
}  # fmt: skip
OBJECT_REFERENCE: Schema = {
    1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string"), 4: ("uid", "string"),
    5: ("apiVersion", "string"), 6: ("resourceVersion", "string"), 7: ("fieldPath", "string"),
}  # fmt: skip
LOCAL_REFERENCE: Schema = {1: ("name", "string")}
POLICY_RULE: Schema = {
    1: ("verbs", ["string"]), 2: ("apiGroups", ["string"]), 3: ("resources", ["string"]),
    4: ("resourceNames", ["string"]), 5: ("nonResourceURLs", ["string"]),
}  # fmt: skip
SUBJECT: Schema = {1: ("kind", "string"), 2: ("apiGroup", "string"), 3: ("name", "string"), 4: ("namespace", "string")}
ROLE_REF: Schema = {1: ("apiGroup", "string"), 2: ("kind", "string"), 3: ("name", "string")}
BINDING: Schema = {1: ("metadata", OBJECT_META), 2: ("subjects", [SUBJECT]), 3: ("roleRef", ROLE_REF)}
RESOURCE_ATTRIBUTES: Schema = {
    1: ("namespace", "string"), 2: ("verb", "string"), 3: ("group", "string"), 4: ("version", "string"),
    5: ("resource", "string"), 6: ("subresource", "string"), 7: ("name", "string"),
}  # fmt: skip
NON_RESOURCE_ATTRIBUTES: Schema = {1: ("path", "string"), 2: ("verb", "string")}
BOUND_OBJECT_REFERENCE: Schema = {
    1: ("kind", "string"),
    2: ("apiVersion", "string"),
    3: ("name", "string"),
    4: ("uid", "string"),
}

KINDS: dict[tuple[str, str], Schema] = {
    ("v1", "Namespace"): {1: ("metadata", OBJECT_META), 2: ("spec", {1: ("finalizers", ["string"])})},
    ("v1", "Secret"): {
        1: ("metadata", OBJECT_META), 2: ("data", "bmap"), 3: ("type", "string"), 4: ("stringData", "smap"),
        5: ("immutable", "bool"),
    },
    ("v1", "ConfigMap"): {
        1: ("metadata", OBJECT_META), 2: ("data", "smap"), 3: ("binaryData", "bmap"), 4: ("immutable", "bool"),
    },
    ("v1", "ServiceAccount"): {
        1: ("metadata", OBJECT_META), 2: ("secrets", [OBJECT_REFERENCE]), 3: ("imagePullSecrets", [LOCAL_REFERENCE]),
        4: ("automountServiceAccountToken", "bool"),
    },
    ("authentication.k8s.io/v1", "TokenRequest"): {
        1: ("metadata", OBJECT_META),
        2: ("spec", {1: ("audiences", ["string"]), 3: ("boundObjectRef", BOUND_OBJECT_REFERENCE),
                     4: ("expirationSeconds", "int")}),
    },
    ("rbac.authorization.k8s.io/v1", "Role"): {1: ("metadata", OBJECT_META), 2: ("rules", [POLICY_RULE])},
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): {1: ("metadata", OBJECT_META), 2: ("rules", [POLICY_RULE])},
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): BINDING,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): BINDING,
    ("authorization.k8s.io/v1", "SelfSubjectAccessReview"): {
        1: ("metadata", OBJECT_META),
        2: ("spec", {1: ("resourceAttributes", RESOURCE_ATTRIBUTES),
                     2: ("nonResourceAttributes", NON_RESOURCE_ATTRIBUTES)}),
    },
}  # fmt: skip
UNKNOWN: Schema = {1: ("typeMeta", {1: ("apiVersion", "string"), 2: ("kind", "string")}), 2: ("raw", "raw")}


class _Malformed(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a message: ints for varints, bytes for length-delimited fields."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _Malformed("truncated field")
            out.append((number, data[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise _Malformed(f"unsupported wire type {wire}")
    return out


def _scalar(kind: Any, value: int | bytes) -> Any:
    if kind == "string":
        if not isinstance(value, bytes):
            raise _Malformed("expected a string")
        return value.decode()
    if kind == "bytes":
        if not isinstance(value, bytes):
            raise _Malformed("expected bytes")
        return base64.b64encode(value).decode()
    if kind == "raw":
        return value
    if kind == "int":
        if not isinstance(value, int):
            raise _Malformed("expected an integer")
        return value - (1 << 64) if value >= 1 << 63 else value
    if kind == "bool":
        return bool(value)
    if isinstance(kind, dict):
        if not isinstance(value, bytes):
            raise _Malformed("expected a message")
        return decode_message(value, kind)
    raise _Malformed(f"unknown type {kind}")


def decode_message(data: bytes, schema: Schema) -> dict[str, Any]:
    """A protobuf message as the JSON dict Kubernetes would send; unknown fields are skipped."""
    out: dict[str, Any] = {}
    for number, value in fields(data):
        if number not in schema:
            continue
        name, kind = schema[number]
        if kind in ("smap", "bmap"):
            if not isinstance(value, bytes):
                raise _Malformed("expected a map entry")
            entry = dict(fields(value))
            key = entry.get(1, b"")
            item = entry.get(2, b"")
            if not isinstance(key, bytes) or not isinstance(item, bytes):
                raise _Malformed("malformed map entry")
            out.setdefault(name, {})[key.decode()] = (
                item.decode() if kind == "smap" else base64.b64encode(item).decode()
            )
        elif isinstance(kind, list):
            out.setdefault(name, []).append(_scalar(kind[0], value))
        else:
            decoded = _scalar(kind, value)
            # Go writes its zero values; kube's JSON omits them (omitempty), and so do we (lists keep "").
            if decoded != "" and not (name == "generation" and decoded == 0):
                out[name] = decoded
    return out


def decode(body: bytes) -> dict[str, Any]:
    """A JSON-shaped object from a protobuf request body; 415 for kinds not described here, 400 if malformed."""
    if not body.startswith(MAGIC):
        raise StatusError(400, "BadRequest", "the protobuf body does not start with the Kubernetes magic number")
    try:
        unknown = decode_message(body[len(MAGIC) :], UNKNOWN)
        type_meta = unknown.get("typeMeta") or {}
        api_version, kind = type_meta.get("apiVersion", ""), type_meta.get("kind", "")
        schema = KINDS.get((api_version, kind))
        if schema is None:
            raise StatusError(
                415,
                "UnsupportedMediaType",
                f"the in-memory API server cannot read {kind or 'this object'} ({api_version}) as protobuf; "
                "send it as application/json",
            )
        obj = decode_message(unknown.get("raw", b""), schema)
    except (_Malformed, UnicodeDecodeError) as exc:
        raise StatusError(400, "BadRequest", f"the protobuf body is malformed: {exc}") from None
    obj["apiVersion"], obj["kind"] = api_version, kind
    return obj
