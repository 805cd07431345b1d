"""Pure parts of the in-memory API server: selectors, patches, validation, GC decisions, store and discovery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa_testing import gc, patch, selectors, validation
from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.resources import Registry, resources_from_crd
from kubemcsa_testing.store import INITIAL_EVENTS_END, Store

# Label selectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a!=b", {"a": "b"}, False),
        ("a in (b, c)", {"a": "c"}, True),
        ("a in (b,c)", {}, False),
        ("a notin (b,c)", {}, True),
        ("a notin (b,c)", {"a": "b"}, False),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("!a", {}, True),
        ("a,b=c", {"a": "x", "b": "c"}, True),
        ("a in (x),b notin (y),!c", {"a": "x", "b": "z"}, True),
        ("example.com/key=v", {"example.com/key": "v"}, True),
        ("a=", {"a": ""}, True),
    ],
)
def test_label_selector(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selectors.parse_label_selector(selector)(labels) is expected


@pytest.mark.parametrize("selector", ["a in (b", "=b", "a=b=c", "a,,b", "-a=b", "a=" + "x" * 64, "a in b"])
def test_malformed_label_selectors_are_400(selector: str) -> None:
    with pytest.raises(StatusError) as exc:
        selectors.parse_label_selector(selector)
    assert exc.value.code == 400


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_label_selector_parses_or_is_a_400(selector: str) -> None:
    try:
        matcher = selectors.parse_label_selector(selector)
    except StatusError as exc:
        assert exc.code == 400
    else:
        matcher({"a": "b"})


def test_field_selectors() -> None:
    obj = {"metadata": {"name": "x", "namespace": "ns"}, "type": "Opaque"}
    assert selectors.parse_field_selector("metadata.name=x,metadata.namespace==ns")(obj)
    assert not selectors.parse_field_selector("metadata.name!=x")(obj)
    assert selectors.parse_field_selector("type=Opaque", ("type",))(obj)
    with pytest.raises(StatusError) as exc:
        selectors.parse_field_selector("spec.foo=bar")
    assert exc.value.code == 400
    assert selectors.field_selector_pins("metadata.name=x,type=y") == {"name": "x"}


def test_structured_label_selector() -> None:
    match = selectors.label_selector_from_dict(
        {"matchLabels": {"a": "b"}, "matchExpressions": [{"key": "c", "operator": "NotIn", "values": ["d"]}]}
    )
    assert match({"a": "b"}) and not match({"a": "b", "c": "d"})
    with pytest.raises(StatusError):
        selectors.label_selector_from_dict({"matchExpressions": [{"key": "c", "operator": "Bad"}]})


# Patches -----------------------------------------------------------------------------------------


def test_merge_patch_deletes_with_null_and_replaces_lists() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert patch.merge_patch(target, {"a": {"b": None, "d": 3}, "l": [3]}) == {"a": {"c": 2, "d": 3}, "l": [3]}
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2]}  # not modified


def test_strategic_merge_patch_merges_lists_by_key() -> None:
    pod = {
        "metadata": {"labels": {"a": "1"}, "finalizers": ["x"]},
        "spec": {
            "volumes": [{"name": "v1", "emptyDir": {}}],
            "containers": [
                {"name": "c1", "image": "i", "volumeMounts": [{"name": "v1", "mountPath": "/a"}],
                 "env": [{"name": "E", "value": "1"}]},
                {"name": "c2", "image": "j"},
            ],
        },
    }  # fmt: skip
    p = {
        "metadata": {"labels": {"b": "2"}, "finalizers": ["y", "x"]},
        "spec": {
            "volumes": [{"name": "v2", "secret": {"secretName": "s"}}],
            "containers": [
                {
                    "name": "c1",
                    "volumeMounts": [{"name": "v2", "mountPath": "/b"}],
                    "env": [{"name": "E", "value": "2"}],
                }
            ],
        },
    }
    out = patch.strategic_merge_patch(pod, p)
    assert out["metadata"] == {"labels": {"a": "1", "b": "2"}, "finalizers": ["x", "y"]}
    assert [v["name"] for v in out["spec"]["volumes"]] == ["v1", "v2"]
    c1 = out["spec"]["containers"][0]
    assert c1["image"] == "i" and [m["mountPath"] for m in c1["volumeMounts"]] == ["/a", "/b"]
    assert c1["env"] == [{"name": "E", "value": "2"}]
    assert out["spec"]["containers"][1] == {"name": "c2", "image": "j"}


def test_strategic_merge_patch_directives() -> None:
    target = {"metadata": {"finalizers": ["a", "b"]}, "spec": {"x": 1, "y": 2}}
    p = {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}, "spec": {"$patch": "replace", "z": 3},
         "$setElementOrder/volumes": [{"name": "v"}]}  # fmt: skip
    assert patch.strategic_merge_patch(target, p) == {"metadata": {"finalizers": ["b"]}, "spec": {"z": 3}}


def test_strategic_merge_patch_replaces_lists_without_merge_key() -> None:
    assert patch.strategic_merge_patch({"args": ["a"]}, {"args": ["b"]}) == {"args": ["b"]}


def test_json_patch_failures_are_status_errors() -> None:
    assert patch.json_patch({"a": 1}, [{"op": "replace", "path": "/a", "value": 2}]) == {"a": 2}
    with pytest.raises(StatusError) as exc:
        patch.json_patch({}, [{"op": "add", "path": "/metadata/labels/x", "value": "y"}])
    assert exc.value.code == 422
    with pytest.raises(StatusError) as exc:
        patch.json_patch({}, {"op": "add"})
    assert exc.value.code == 400
    with pytest.raises(StatusError):
        patch.json_patch({}, [{"path": "/a"}])


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda c: st.dictionaries(st.text(max_size=3), c)))
@settings(max_examples=60, deadline=None)
def test_patches_never_crash_on_odd_input(value: object) -> None:
    for content_type in patch.PATCH_TYPES:
        try:
            patch.apply_patch(content_type, {"metadata": {"name": "x"}}, value)
        except StatusError as exc:
            assert exc.code in (400, 422)


# Validation --------------------------------------------------------------------------------------


def _info(plural: str):
    return next(i for i in Registry().all() if i.plural == plural and i.group in ("", "apiextensions.k8s.io"))


def test_names_are_validated_per_resource() -> None:
    assert validation.name_causes("ok-name.x", "subdomain") == []
    assert validation.name_causes("Bad_Name", "subdomain")
    assert validation.name_causes("a.b", "label")
    assert validation.name_causes("system:controller:x", "path") == []
    assert validation.name_causes("a/b", "path")


def test_missing_name_and_bad_labels() -> None:
    causes = validation.object_causes({"metadata": {"labels": {"-x": "y", "ok": "bad value"}}}, _info("configmaps"))
    fields = [field for field, _ in causes]
    assert "metadata.name" in fields and fields.count("metadata.labels") == 2


def test_secret_values_must_be_base64() -> None:
    causes = validation.object_causes({"metadata": {"name": "s"}, "data": {"k": "not base64!"}}, _info("secrets"))
    assert causes and causes[0][0] == "data[k]"
    assert validation.object_causes({"metadata": {"name": "s"}, "data": {"k": "dg=="}}, _info("secrets")) == []


SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["size"],
            "properties": {
                "size": {"type": "integer", "minimum": 1, "maximum": 10},
                "color": {"type": "string", "enum": ["red"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    },
}


def test_schema_validation_reports_each_violation() -> None:
    causes = dict(validation.schema_causes({"spec": {"size": 0, "color": "blue", "tags": [1]}}, SCHEMA))
    assert "greater than or equal to 1" in causes["spec.size"]
    assert "Unsupported value" in causes["spec.color"]
    assert "must be of type string" in causes["spec.tags[0]"]
    assert validation.schema_causes({"spec": {}}, SCHEMA) == [("spec.size", "Required value")]
    assert "must be of type integer" in validation.schema_causes({"spec": {"size": "1"}}, SCHEMA)[0][1]


def test_unknown_fields_are_listed_for_strict_validation() -> None:
    obj = {"metadata": {"x": 1}, "spec": {"size": 1, "colour": "red", "free": {"a": 1}, "tags": ["a"]}, "other": 1}
    assert validation.unknown_fields(obj, SCHEMA) == ["spec.colour", "other"]


def test_pruning_drops_unknown_fields_but_keeps_preserved_ones() -> None:
    obj = {"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"}, "extra": 1,
           "spec": {"size": 1, "unknown": 2, "free": {"any": {"thing": 1}}}}  # fmt: skip
    assert validation.prune(obj, SCHEMA) == {
        "apiVersion": "x/v1", "kind": "K", "metadata": {"name": "n"}, "spec": {"size": 1, "free": {"any": {"thing": 1}}}
    }  # fmt: skip


# Garbage collection ------------------------------------------------------------------------------


def test_gc_decisions() -> None:
    a, b = {"uid": "a"}, {"uid": "b"}
    assert gc.decide([], []) == gc.KEEP
    assert gc.decide([a, b], [a, b]) == gc.KEEP
    assert gc.decide([a, b], []) == gc.DELETE
    assert gc.decide([a, b], [a]) == gc.DROP_REFS


# Registry and discovery --------------------------------------------------------------------------


def test_discovery_lists_subresources_and_crd_resources() -> None:
    registry = Registry()
    core = registry.resource_list("", "v1")
    assert core is not None
    names = {r["name"]: r for r in core["resources"]}
    assert names["serviceaccounts/token"]["kind"] == "TokenRequest"
    assert names["pods/status"]["verbs"] == ["get", "patch", "update"]
    assert names["secrets"]["namespaced"] and not names["namespaces"]["namespaced"]
    crd = {
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Cluster", "names": {"plural": "widgets", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}}},
                              {"name": "v2", "served": False, "storage": False}]},
    }  # fmt: skip
    assert [i.version for i in resources_from_crd(crd)] == ["v1"]
    registry.set_crd(crd)
    assert registry.lookup("example.com", "v1", "widgets") is not None
    assert any(g["name"] == "example.com" for g in registry.api_group_list()["groups"])
    registry.remove_crd("widgets.example.com")
    assert registry.lookup("example.com", "v1", "widgets") is None
    assert resources_from_crd({"spec": "nonsense"}) == []


# Store -------------------------------------------------------------------------------------------


def _obj(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": name, "labels": labels or {}}}


def test_store_resource_versions_increase_and_watch_replays_history() -> None:
    store = Store(history_size=3)
    info = _info("configmaps")
    first = store.create(info, _obj("a"))
    second = store.update(info, _obj("a"), first["metadata"]["resourceVersion"])
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    with pytest.raises(StatusError) as exc:
        store.update(info, _obj("a"), first["metadata"]["resourceVersion"])
    assert exc.value.reason == "Conflict"
    watcher = store.watch(info, "ns", lambda o: True, int(first["metadata"]["resourceVersion"]))
    assert watcher.next(0) == ("MODIFIED", second)
    for name in "bcd":
        store.create(info, _obj(name))
    with pytest.raises(StatusError) as exc:
        store.watch(info, "ns", lambda o: True, int(first["metadata"]["resourceVersion"]))
    assert exc.value.code == 410


def test_store_watch_turns_selector_transitions_into_added_and_deleted() -> None:
    store = Store()
    info = _info("configmaps")
    watcher = store.watch(info, None, lambda o: o["metadata"]["labels"].get("x") == "1", None)
    assert watcher.next(0)[0] == INITIAL_EVENTS_END
    created = store.create(info, _obj("a"))
    moved_in = store.update(info, _obj("a", {"x": "1"}), created["metadata"]["resourceVersion"])
    moved_out = store.update(info, _obj("a", {"x": "2"}), moved_in["metadata"]["resourceVersion"])
    assert watcher.next(0) == ("ADDED", moved_in)
    # As kube's cacher: the object leaving the selection is sent with its previous content at the new version.
    version = moved_out["metadata"]["resourceVersion"]
    assert watcher.next(0) == (
        "DELETED",
        {**moved_in, "metadata": {**moved_in["metadata"], "resourceVersion": version}},
    )
    assert watcher.next(0) is None


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["metadata", "spec", "name", "data", "names",
                                                                           "versions", "labels", "containers", "x"]),
                                                          c, max_size=4),
    max_leaves=12,
)  # fmt: skip


@given(_JSON)
@settings(max_examples=300, deadline=None)
def test_validation_never_crashes_on_odd_objects(value: object) -> None:
    for info in Registry().all():
        obj = value if isinstance(value, dict) else {"metadata": {"name": "x"}, "spec": value}
        validation.object_causes(obj, info)
        validation.schema_causes(obj, SCHEMA)
        validation.prune(obj, SCHEMA)


# Protobuf request bodies (kubectl's imperative commands) ---------------------------------------------


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _entry(key: str, value: bytes) -> bytes:
    return _field(1, key.encode()) + _field(2, value)


def test_protobuf_secret_is_decoded_like_its_json() -> None:
    from kubemcsa_testing import protobuf

    meta = _field(1, b"sec") + _field(2, b"") + _field(11, _entry("app", b"x"))
    secret = _field(1, meta) + _field(2, _entry("k", b"\x00\xff")) + _field(3, b"Opaque") + _field(5, 0)
    unknown = _field(1, _field(1, b"v1") + _field(2, b"Secret")) + _field(2, secret)
    assert protobuf.decode(protobuf.MAGIC + unknown) == {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec", "labels": {"app": "x"}},
        "data": {"k": "AP8="}, "type": "Opaque", "immutable": False,
    }  # fmt: skip


def test_protobuf_token_request_and_unknown_kinds() -> None:
    from kubemcsa_testing import protobuf

    spec = _field(1, b"aud") + _field(4, 1200)
    unknown = _field(1, _field(1, b"authentication.k8s.io/v1") + _field(2, b"TokenRequest")) + _field(
        2, _field(2, spec)
    )
    assert protobuf.decode(protobuf.MAGIC + unknown)["spec"] == {"audiences": ["aud"], "expirationSeconds": 1200}
    other = _field(1, _field(1, b"apps/v1") + _field(2, b"Deployment")) + _field(2, b"")
    with pytest.raises(StatusError) as exc:
        protobuf.decode(protobuf.MAGIC + other)
    assert exc.value.code == 415


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_protobuf_garbage_is_a_400_or_415(data: bytes) -> None:
    from kubemcsa_testing import protobuf

    for body in (data, protobuf.MAGIC + data):
        try:
            protobuf.decode(body)
        except StatusError as exc:
            assert exc.code in (400, 415)


_HEADER_NAMES = st.sampled_from(["Host", "Authorization", "authorization", "Accept", "X-A", "x-a", "Content-Type"])
_HEADER_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)


@given(
    st.lists(
        st.one_of(
            st.tuples(_HEADER_NAMES, _HEADER_VALUES).map(lambda f: f"{f[0]}:{f[1]}\r\n"),
            _HEADER_VALUES.map(lambda v: f" {v}\r\n"),  # a continuation line
            _HEADER_VALUES.map(lambda v: f"{v}\r\n"),  # maybe no field at all
        ),
        max_size=8,
    )
)
def test_request_headers_answer_as_the_standard_library_parser(lines: list[str]) -> None:
    """The server's own header parser gives what http.client.parse_headers (the email package) gives."""
    import http.client
    import io

    from kubemcsa_testing.server import RequestHeaders

    raw = "".join(lines).encode("iso-8859-1") + b"\r\n"
    block = raw[: raw.index(b"\r\n\r\n") + 4] if b"\r\n\r\n" in raw else raw
    expected = http.client.parse_headers(io.BytesIO(block))
    got = RequestHeaders.parse(io.BytesIO(block).readlines())
    for name in ("Host", "AUTHORIZATION", "accept", "x-a", "Content-Type", "Missing"):
        assert got.get(name) == expected.get(name)
        assert got.get_all(name) == expected.get_all(name)


def test_controllers_are_woken_only_for_events_they_act_on() -> None:
    from kubemcsa_testing.controllers import needs_handling
    from kubemcsa_testing.store import Event

    def event(kind: str, key: str = "/configmaps", **fields: object) -> Event:
        meta = {"name": "x", "namespace": "default", "uid": "u", **fields.pop("meta", {})}  # type: ignore[dict-item]
        return Event(1, key, kind, {"metadata": meta, **fields}, None)

    assert not needs_handling(event("ADDED"))
    assert not needs_handling(event("MODIFIED", "multicluster.admiralty.io/serviceaccountimports"))
    assert needs_handling(event("DELETED"))
    assert needs_handling(event("MODIFIED", meta={"ownerReferences": [{"uid": "o"}]}))
    owned = event("ADDED", meta={"ownerReferences": [{"uid": "o"}, {"uid": "p"}]})
    assert not needs_handling(owned, owner_exists={"o", "p"}.__contains__)  # nothing to collect
    assert needs_handling(owned, owner_exists={"o"}.__contains__)  # one owner gone: drop its reference
    assert needs_handling(event("ADDED", meta={"ownerReferences": ["not an object"]}), owner_exists=lambda uid: True)
    being_deleted = {"ownerReferences": [{"uid": "o"}], "deletionTimestamp": "2026-01-01T00:00:00Z"}
    assert needs_handling(event("MODIFIED", meta=being_deleted), owner_exists=lambda uid: True)
    assert needs_handling(event("MODIFIED", meta={"deletionTimestamp": "2026-01-01T00:00:00Z"}))
    token = {"type": "kubernetes.io/service-account-token"}
    assert needs_handling(event("ADDED", "/secrets", **token))
    assert not needs_handling(event("MODIFIED", "/secrets", **token))
    assert not needs_handling(event("ADDED", "/secrets", type="Opaque"))


def test_a_watch_hands_out_what_is_queued_and_keeps_its_end() -> None:
    store = Store()
    info = Registry().lookup("", "v1", "configmaps")
    assert info is not None
    watcher = store.watch(info, None, lambda obj: True, None)
    for i in range(3):
        store.create(info, {"metadata": {"name": f"cm-{i}", "namespace": "default", "uid": f"u{i}"}})
    assert watcher.next(0)[0] == INITIAL_EVENTS_END
    assert [obj["metadata"]["name"] for _, obj in watcher.pending(2)] == ["cm-0", "cm-1"]
    watcher.close()
    assert [obj["metadata"]["name"] for _, obj in watcher.pending(10)] == ["cm-2"]
    assert watcher.pending(10) == []
    with pytest.raises(EOFError):
        watcher.next(0)
