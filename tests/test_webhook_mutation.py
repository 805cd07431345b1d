"""The pure mutation decision: what gets mounted, what is refused, and that patches always apply and converge."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubemcsa.contract import api
from kubemcsa.contract.federation import projected_volume
from kubemcsa.contract.spec import FederatedImport, federated_import
from webhook import mutation
from webhook.lookups import StaticCache

NS = "apps"
ENABLED = {api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE}


def lookup(*imports: str, labels: dict[str, str] | None = None) -> StaticCache:
    return StaticCache({NS: ENABLED if labels is None else labels}, {(NS, name) for name in imports})


def pod(annotation: str | None = "a", **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "p"}
    if annotation is not None:
        metadata["annotations"] = {api.IMPORT_ANNOTATION: annotation}
    spec.setdefault("containers", [{"name": "main", "image": "x"}])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def mutated(p: dict[str, Any], decision: mutation.Decision) -> dict[str, Any]:
    assert decision.allowed, decision.message
    return jsonpatch.apply_patch(p, decision.patch)


def test_no_annotation_is_allowed_without_patch_and_without_lookup() -> None:
    class Explodes:
        def namespace_labels(self, namespace: str) -> None:
            raise AssertionError("looked up")

        def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
            raise AssertionError("looked up")

    assert mutation.decide(pod(None), NS, Explodes()) == mutation.ALLOW
    assert mutation.decide(pod(" , "), NS, Explodes()) == mutation.ALLOW


@pytest.mark.parametrize("labels", [{}, {api.NAMESPACE_LABEL: "disabled"}, None])
def test_namespace_not_enabled_is_never_mutated(labels: dict[str, str] | None) -> None:
    cache = StaticCache({NS: labels} if labels is not None else {}, {(NS, "a")})
    assert mutation.decide(pod("a"), NS, cache) == mutation.ALLOW


def test_one_import_mounts_its_secret_in_every_container() -> None:
    p = pod(
        "a",
        containers=[{"name": "c1"}, {"name": "c2", "volumeMounts": [{"name": "v", "mountPath": "/v"}]}],
        initContainers=[{"name": "i"}],
        ephemeralContainers=[{"name": "e"}],
        volumes=[{"name": "v", "emptyDir": {}}],
    )
    result = mutated(p, mutation.decide(p, NS, lookup("a")))
    volume = {"name": "sai-a", "secret": {"secretName": "a-token"}}
    mount = {"name": "sai-a", "mountPath": f"{api.MOUNT_ROOT}/a", "readOnly": True}
    assert result["spec"]["volumes"] == [{"name": "v", "emptyDir": {}}, volume]
    assert result["spec"]["containers"][0]["volumeMounts"] == [mount]
    assert result["spec"]["containers"][1]["volumeMounts"] == [{"name": "v", "mountPath": "/v"}, mount]
    assert result["spec"]["initContainers"][0]["volumeMounts"] == [mount]
    assert result["spec"]["ephemeralContainers"][0]["volumeMounts"] == [mount]


def test_absent_arrays_are_created_whole_and_present_ones_appended() -> None:
    p = pod("a,b")
    decision = mutation.decide(p, NS, lookup("a", "b"))
    assert [op["path"] for op in decision.patch] == ["/spec/volumes", "/spec/containers/0/volumeMounts"]
    p = pod("a,b", volumes=[], containers=[{"name": "c", "volumeMounts": []}])
    decision = mutation.decide(p, NS, lookup("a", "b"))
    assert [op["path"] for op in decision.patch] == ["/spec/volumes/-"] * 2 + ["/spec/containers/0/volumeMounts/-"] * 2


def test_several_imports_whitespace_and_repeats_are_tolerated() -> None:
    p = pod(" a, ,b ,a,")
    result = mutated(p, mutation.decide(p, NS, lookup("a", "b")))
    assert [v["name"] for v in result["spec"]["volumes"]] == ["sai-a", "sai-b"]
    assert [m["mountPath"] for m in result["spec"]["containers"][0]["volumeMounts"]] == [
        f"{api.MOUNT_ROOT}/a",
        f"{api.MOUNT_ROOT}/b",
    ]


def test_missing_imports_are_named_with_the_namespace() -> None:
    decision = mutation.decide(pod("a,b,c"), NS, lookup("b"))
    assert not decision.allowed
    assert decision.reason == mutation.REASON_IMPORT_NOT_FOUND
    assert '"a", "c"' in decision.message and f'namespace "{NS}"' in decision.message
    assert "create them" in decision.message
    single = mutation.decide(pod("a"), NS, lookup())
    assert 'ServiceAccountImport "a" does not exist in namespace "apps"' in single.message


def test_invalid_import_names_are_refused_without_lookup() -> None:
    decision = mutation.decide(pod("ok,../etc,UPPER"), NS, lookup("ok"))
    assert decision.reason == mutation.REASON_INVALID_IMPORT_NAME
    assert '"../etc", "UPPER"' in decision.message


def test_reinvocation_adds_nothing() -> None:
    p = pod("a,b", initContainers=[{"name": "i"}])
    once = mutated(p, mutation.decide(p, NS, lookup("a", "b")))
    assert mutation.decide(once, NS, lookup("a", "b")) == mutation.Decision(allowed=True)


def test_partially_mounted_pod_gets_only_what_is_missing() -> None:
    p = pod(
        "a,b",
        volumes=[{"name": "sai-a", "secret": {"secretName": "a-token", "defaultMode": 420}}],
        containers=[{"name": "c", "volumeMounts": [{"name": "sai-a", "mountPath": f"{api.MOUNT_ROOT}/a/"}]}],
    )
    decision = mutation.decide(p, NS, lookup("a", "b"))
    assert [op["value"]["name"] for op in decision.patch] == ["sai-b", "sai-b"]


def test_volume_name_collision_is_refused() -> None:
    p = pod("a", volumes=[{"name": "sai-a", "emptyDir": {}}])
    decision = mutation.decide(p, NS, lookup("a"))
    assert decision.reason == mutation.REASON_VOLUME_CONFLICT
    assert '"sai-a"' in decision.message and "rename" in decision.message


def test_mount_path_collision_is_refused() -> None:
    p = pod(
        "a",
        volumes=[{"name": "mine", "emptyDir": {}}],
        containers=[{"name": "c", "volumeMounts": [{"name": "mine", "mountPath": f"{api.MOUNT_ROOT}/a"}]}],
    )
    decision = mutation.decide(p, NS, lookup("a"))
    assert decision.reason == mutation.REASON_MOUNT_CONFLICT
    assert 'Container "c"' in decision.message and '"mine"' in decision.message


@pytest.mark.parametrize(
    "bad",
    [
        "not a pod",
        {"metadata": "x"},
        {"metadata": {"annotations": ["x"]}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: 3}}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}, "spec": []},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}, "spec": {"volumes": {}}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}, "spec": {"containers": "c"}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}, "spec": {"containers": [1]}},
        {"metadata": {"annotations": {api.IMPORT_ANNOTATION: "a"}}, "spec": {"containers": [{"volumeMounts": 1}]}},
    ],
)
def test_malformed_pods_are_refused_clearly(bad: Any) -> None:
    decision = mutation.decide(bad, NS, lookup("a"))
    assert not decision.allowed
    assert decision.reason == mutation.REASON_INVALID_POD
    assert decision.message


def test_invalid_namespace_is_refused() -> None:
    assert mutation.decide(pod("a"), "", lookup("a")).reason == mutation.REASON_INVALID_POD


# Property tests: small alphabets so that generated pods often collide with what the webhook adds.
IMPORTS = ["a", "b", "c.d"]
_volume_names = st.sampled_from(["sai-a", "sai-b", "scratch", "x", "sai-c-d-" + "0" * 8])
_paths = st.sampled_from([f"{api.MOUNT_ROOT}/a", f"{api.MOUNT_ROOT}/b/", "/data", "/x", f"{api.MOUNT_ROOT}/c.d"])
_volumes = st.lists(
    st.builds(
        lambda name, source: {"name": name, **source},
        _volume_names,
        st.sampled_from(
            [
                {"emptyDir": {}},
                {"secret": {"secretName": "a-token"}},
                {"secret": {"secretName": "b-token", "defaultMode": 420}},
            ]
        ),
    ),
    max_size=4,
    unique_by=lambda v: v["name"],
)
_mounts = st.lists(
    st.fixed_dictionaries({"name": _volume_names, "mountPath": _paths}),
    max_size=3,
    unique_by=lambda m: m["mountPath"].rstrip("/"),
)
_container = st.builds(
    lambda name, mounts: {"name": name} if mounts is None else {"name": name, "volumeMounts": mounts},
    st.text("abc", min_size=1, max_size=3),
    st.none() | _mounts,
)
_containers = st.lists(_container, min_size=1, max_size=3)
_annotation = st.lists(st.sampled_from([*IMPORTS, " ", ""]), min_size=1, max_size=4).map(",".join)


@st.composite
def pods(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": draw(_containers)}
    for optional, strategy in (("volumes", _volumes), ("initContainers", _containers)):
        value = draw(st.none() | strategy)
        if value is not None:
            spec[optional] = value
    return pod(draw(_annotation), **spec)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(pods())
def test_patch_always_applies_and_reinvocation_adds_nothing(p: dict[str, Any]) -> None:
    original = copy.deepcopy(p)
    cache = lookup(*IMPORTS)
    decision = mutation.decide(p, NS, cache)
    assert p == original, "the decision must not modify the pod"
    if not decision.allowed:
        assert decision.reason in (mutation.REASON_VOLUME_CONFLICT, mutation.REASON_MOUNT_CONFLICT)
        return
    # The pre-serialized patch (what is sent) says exactly what the operations say.
    assert json.loads(decision.patch_json or "[]") == decision.patch
    result = jsonpatch.apply_patch(p, decision.patch)
    assert mutation.decide(result, NS, cache) == mutation.Decision(allowed=True)
    names = api.parse_import_annotation(p["metadata"]["annotations"][api.IMPORT_ANNOTATION])
    volumes = {v["name"]: v for v in result["spec"].get("volumes", [])}
    for name in names:
        assert volumes[api.volume_name_for_import(name)]["secret"]["secretName"] == api.secret_name_for_import(name)
        for container in result["spec"]["containers"] + result["spec"].get("initContainers", []):
            paths = {m["mountPath"].rstrip("/"): m["name"] for m in container["volumeMounts"]}
            assert paths[api.mount_path_for_import(name)] == api.volume_name_for_import(name)


def test_more_imports_than_the_cap_are_refused_naming_the_cap() -> None:
    names = [f"i{n}" for n in range(api.MAX_IMPORTS_PER_POD + 1)]
    decision = mutation.decide(pod(",".join(names)), NS, lookup(*names))
    assert decision.reason == mutation.REASON_TOO_MANY_IMPORTS
    assert f"more than {api.MAX_IMPORTS_PER_POD} imports" in decision.message
    at_cap = mutation.decide(pod(",".join(names[:-1])), NS, lookup(*names))
    assert at_cap.allowed and len(at_cap.patch) == 2


def test_eighty_thousand_names_are_refused_after_reading_only_the_first_ones() -> None:
    prepared = mutation.prepare(pod(",".join(f"n{i}" for i in range(80_000))))
    assert len(prepared.names) == api.MAX_IMPORTS_PER_POD + 1 and prepared.planned is None
    assert mutation.finish(prepared, NS, lookup()).reason == mutation.REASON_TOO_MANY_IMPORTS


def test_pods_with_too_many_containers_are_refused() -> None:
    many = [{"name": f"c{i}"} for i in range(mutation.MAX_CONTAINERS + 1)]
    decision = mutation.decide(pod("a", containers=many), NS, lookup("a"))
    assert decision.reason == mutation.REASON_TOO_MANY_CONTAINERS
    assert str(mutation.MAX_CONTAINERS) in decision.message


def test_a_huge_invalid_name_is_cut_in_the_message() -> None:
    decision = mutation.decide(pod("x" * 1_000_000 + ".-"), NS, lookup())
    assert decision.reason == mutation.REASON_INVALID_IMPORT_NAME
    assert len(decision.message) < 400


def test_unknown_names_are_looked_up_once_for_all() -> None:
    calls: list[tuple[str, ...]] = []

    class Counting(StaticCache):
        def missing_imports(self, namespace: str, names: Sequence[str]) -> list[str]:
            calls.append(tuple(names))
            return super().missing_imports(namespace, names)

    names = [f"u{i}" for i in range(api.MAX_IMPORTS_PER_POD)]
    decision = mutation.decide(pod(",".join(names)), NS, Counting({NS: ENABLED}, set()))
    assert decision.reason == mutation.REASON_IMPORT_NOT_FOUND and len(calls) == 1


def test_colliding_volume_names_get_two_volumes() -> None:
    a, b = "a" * 60 + ".136926", "a" * 60 + ".170219"
    p = pod(f"{a},{b}")
    result = mutated(p, mutation.decide(p, NS, lookup(a, b)))
    volumes = [v["name"] for v in result["spec"]["volumes"]]
    assert len(set(volumes)) == 2
    assert mutation.decide(result, NS, lookup(a, b)) == mutation.Decision(allowed=True)


# --- federated imports: a projected volume at the same path -------------------------------------------------------


def federated_lookup(
    audience: str | None = None,
    expiration: int = 3600,
    recorded: bool = True,
    allowed: tuple[str, ...] = ("cluster2-aud",),
) -> StaticCache:
    fed = {(NS, "fed"): FederatedImport("cluster2", (audience,) if audience else (), expiration)}
    audiences = {"cluster2": allowed} if recorded else {}
    return StaticCache({NS: ENABLED}, {(NS, "plain")}, federated=fed, audiences=audiences)


def test_a_federated_import_is_a_projected_volume_at_the_same_path_beside_secret_ones() -> None:
    p = pod("plain,fed", initContainers=[{"name": "i"}])
    out = mutated(p, mutation.decide(p, NS, federated_lookup()))
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    assert volumes["sai-plain"] == {"name": "sai-plain", "secret": {"secretName": "plain-token"}}
    assert volumes["sai-fed"] == projected_volume("sai-fed", "fed-token", "cluster2-aud", 3600)
    for container in out["spec"]["containers"] + out["spec"]["initContainers"]:
        paths = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert paths["sai-fed"] == api.mount_path_for_import("fed")
    # Reinvocation adds nothing.
    assert mutation.decide(out, NS, federated_lookup()) == mutation.Decision(allowed=True)


def test_the_imports_own_audience_and_lifetime_win() -> None:
    lookup = federated_lookup("mine", 7200, allowed=("cluster2-aud", "mine"))  # the record allows it
    out = mutated(pod("fed"), mutation.decide(pod("fed"), NS, lookup))
    (volume,) = out["spec"]["volumes"]
    assert volume["projected"]["sources"][1]["serviceAccountToken"] == {
        "path": "token",
        "audience": "mine",
        "expirationSeconds": 7200,
    }


def test_a_federated_import_without_a_known_audience_is_refused_with_the_fix() -> None:
    decision = mutation.decide(pod("fed"), NS, federated_lookup(recorded=False))
    assert not decision.allowed and decision.reason == mutation.REASON_UNKNOWN_FEDERATED_SOURCE
    assert "kubemcsa federate" in decision.message
    # Its own spec.audiences does not make it known: only a record says where a pod's token may go.
    decision = mutation.decide(pod("fed"), NS, federated_lookup("mine", recorded=False))
    assert not decision.allowed and decision.reason == mutation.REASON_UNKNOWN_FEDERATED_SOURCE


@pytest.mark.parametrize("audience", ["https://cluster1.example", "cluster3", "garbage"])
def test_a_federated_import_asking_for_an_audience_its_record_does_not_allow_is_refused_with_the_fix(
    audience: str,
) -> None:
    """As its import's AudienceNotAllowed condition: the pod is not given a token for an audience no admin chose
    (this cluster's own, another source's, anything), nor silently another audience than its import asks for."""
    decision = mutation.decide(pod("fed"), NS, federated_lookup(audience))
    assert not decision.allowed and decision.reason == mutation.REASON_AUDIENCE_NOT_ALLOWED == "AudienceNotAllowed"
    assert f"not {audience} of spec.audiences" in decision.message
    assert "remove spec.audiences" in decision.message and "--audience cluster2-aud" in decision.message
    assert "serviceAccountToken" not in decision.patch_json


def test_the_webhook_reads_a_federated_spec_leniently() -> None:
    spec = {"clusterName": "c2", "namespace": "d", "tokenType": "Federated"}
    assert federated_import({"spec": spec}) == FederatedImport("c2", (), 3600)
    odd = {**spec, "audiences": ["a", "b"], "expirationSeconds": 5}
    assert federated_import({"spec": odd}) == FederatedImport("c2", ("a", "b"), 3600)
    assert federated_import({"spec": {**spec, "tokenType": "TokenRequest"}}) is None
    assert federated_import({"spec": "garbage"}) is None


# --- only Secrets the import controls (issue 17) -------------------------------------------------------------------


def _import_with(status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "imp", "namespace": NS}, "status": status}


def test_a_secret_the_controller_says_is_someone_elses_is_not_mounted() -> None:
    from webhook.lookups import unowned_secret

    conflict = {"type": "Ready", "status": "False", "reason": api.REASON_SECRET_CONFLICT, "message": "taken"}
    why = unowned_secret(_import_with({"conditions": [conflict]}))
    assert why is not None and '"imp-token"' in why and "not controlled" in why
    # Not reconciled yet, Ready for another reason, a conflict in the source while its own Secret is listed,
    # or a malformed status: mounted as before (the pod waits for its Secret).
    for status in (
        None,
        {},
        {"conditions": [{**conflict, "reason": api.REASON_NOT_EXPORTED}]},
        {"conditions": [conflict], "secrets": [{"name": "imp-token"}]},
        {"conditions": "garbage"},
        "garbage",
    ):
        assert unowned_secret(_import_with(status)) is None, status
    cache = StaticCache({NS: ENABLED}, {(NS, "imp"), (NS, "ok")}, unowned={(NS, "imp"): why})
    decision = mutation.decide(pod("ok,imp"), NS, cache)
    assert (decision.allowed, decision.reason) == (False, mutation.REASON_SECRET_NOT_CONTROLLED)
    assert mutation.decide(pod("ok"), NS, cache).allowed


# The planner's cache (a patch per pod shape) must answer exactly what the full planner answers, for any pod:
# duplicates, junk items and malformed lists included.
_junk = st.sampled_from([None, 3, "x", [], {"name": ["unhashable"]}, {"mountPath": 7}])
_volume = st.builds(
    lambda name, source: {"name": name, **source},
    _volume_names,
    st.sampled_from([{"emptyDir": {}}, {"secret": {"secretName": "a-token"}}, {"secret": {"secretName": "b-token"}}]),
)
_any_volumes = st.lists(_volume | _junk, max_size=5)
_any_mounts = st.lists(st.fixed_dictionaries({"name": _volume_names | _junk, "mountPath": _paths}) | _junk, max_size=4)
_any_container = st.builds(
    lambda name, mounts: {"name": name} if mounts is None else {"name": name, "volumeMounts": mounts},
    st.text("abc", min_size=1, max_size=3),
    st.none() | _any_mounts | st.just("not a list"),
) | st.just("not a container")


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(st.sampled_from(IMPORTS), min_size=1, max_size=3, unique=True),
    st.none() | _any_volumes | st.just({"not": "a list"}),
    st.lists(_any_container, max_size=3),
    st.none() | st.lists(_any_container, max_size=2),
)
def test_the_cached_plan_of_a_pod_shape_is_the_full_planners(
    names: list[str], volumes: Any, containers: list[Any], init_containers: Any
) -> None:
    spec: dict[str, Any] = {"containers": containers}
    if volumes is not None:
        spec["volumes"] = volumes
    if init_containers is not None:
        spec["initContainers"] = init_containers
    for _ in range(2):  # the second time from the cache
        assert mutation.plan_patch({"spec": spec}, names) == mutation._plan_patch(spec, names)
