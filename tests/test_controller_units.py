"""Unit tests of the controller's pure parts: spec validation, decisions, the work queue, file sources."""

from __future__ import annotations

import base64
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import reconcile as rc
from controller.queue import WorkQueue
from controller.sources import ORIGIN_KUBECONFIG, ORIGIN_MOUNTED, SourceRegistry
from controller.spec import TOKEN_TYPE_LEGACY, SpecError, parse_spec
from kubemcsa import api
from kubemcsa.credentials import Credentials, from_secret_data
from kubemcsa.timefmt import format_time, parse_time

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
REMOTE = rc.Remote(cluster_name="cluster2", server="https://127.0.0.1:6443", ca_pem=CA)
NOW = 1_800_000_000.0


def make_import(**spec) -> dict:
    body = {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister", **spec}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "imp", "namespace": "ns1", "uid": "uid-1", "generation": 1, "resourceVersion": "5"},
        "spec": body,
    }


# --- spec ----------------------------------------------------------------------------------------------------------
def test_spec_defaults() -> None:
    spec = parse_spec(make_import())
    assert (spec.cluster_name, spec.namespace, spec.name) == ("cluster2", "default", "pod-lister")
    assert spec.expiration_seconds == api.DEFAULT_EXPIRATION_SECONDS
    assert spec.audiences == ()
    assert not spec.legacy


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"clusterName": ""}, "clusterName"),
        ({"name": None}, "spec.name"),
        ({"namespace": "Not_Valid"}, "spec.namespace"),
        ({"expirationSeconds": 599}, "expirationSeconds"),
        ({"expirationSeconds": "600"}, "expirationSeconds"),
        ({"expirationSeconds": True}, "expirationSeconds"),
        ({"audiences": "a"}, "audiences"),
        ({"audiences": [""]}, "audiences"),
        ({"tokenType": "Forever"}, "tokenType"),
        ({"tokenType": TOKEN_TYPE_LEGACY, "audiences": ["x"]}, "audiences"),
    ],
)
def test_spec_rejects_bad_fields_naming_them(spec: dict, field: str) -> None:
    with pytest.raises(SpecError, match=field):
        parse_spec(make_import(**spec))


def test_spec_missing() -> None:
    with pytest.raises(SpecError):
        parse_spec({"metadata": {}})
    with pytest.raises(SpecError):
        parse_spec("nonsense")


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=12), c),
        max_leaves=10,
    )
)
def test_spec_never_crashes_on_garbage(value) -> None:
    for obj in (value, {"spec": value}, make_import(audiences=value), make_import(expirationSeconds=value)):
        try:
            parse_spec(obj)
        except SpecError:
            pass


# --- time ----------------------------------------------------------------------------------------------------------
def test_time_round_trip() -> None:
    assert format_time(NOW) == "2027-01-15T08:00:00Z"
    assert parse_time(format_time(NOW)) == NOW
    assert parse_time("garbage") is None
    assert parse_time(None) is None


# --- decisions -----------------------------------------------------------------------------------------------------
def issued(imp: dict, at: float = NOW, lifetime: float = 1000, token: str = "tok-1") -> rc.IssuedToken:
    return rc.IssuedToken(
        token=token,
        issued_at=at,
        expires_at=at + lifetime,
        inputs_hash=rc.inputs_hash(parse_spec(imp), REMOTE),
        server=REMOTE.server,
        ca_pem=CA,
        namespace="default",
    )


def converge(imp: dict, token: rc.IssuedToken, now: float = NOW) -> tuple[dict, dict]:
    """Apply the decision for a fresh import: returns (import with status, Secret) as the server would store them."""
    first = rc.decide(imp, None, now, remote=REMOTE, issued=None)
    assert first.request_token
    d = rc.decide(imp, None, now, remote=REMOTE, issued=token)
    assert d.create_secret and d.secret is not None and d.status is not None
    secret = dict(d.secret)
    secret["metadata"] = {**secret["metadata"], "resourceVersion": "9"}
    return {**imp, "status": d.status}, secret


def test_new_import_requests_then_writes_secret_and_status() -> None:
    imp = make_import()
    token = issued(imp)
    first = rc.decide(imp, None, NOW, remote=REMOTE)
    assert first.request_token and first.secret is None and first.status is None
    d = rc.decide(imp, None, NOW, remote=REMOTE, issued=token)
    assert d.create_secret
    secret = d.secret
    assert secret["metadata"]["name"] == api.secret_name_for_import("imp")
    assert secret["metadata"]["labels"][api.IMPORT_LABEL] == "imp"
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "uid-1" and owner["controller"] and owner["blockOwnerDeletion"]
    assert set(secret["data"]) == set(api.SECRET_KEYS)
    assert from_secret_data(secret["data"]).token == "tok-1"
    ready = d.status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", api.REASON_TOKEN_ISSUED)
    assert d.status["secrets"] == [{"name": "imp-token"}]
    assert d.status["observedGeneration"] == 1
    assert d.status["expirationTimestamp"] == format_time(NOW + 1000)
    assert d.requeue_at == pytest.approx(NOW + 800)
    assert not d.events  # no Event on first issue: at most 3 API calls per new import


def test_steady_state_decides_nothing() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    d = rc.decide(imp2, secret, NOW + 10, remote=REMOTE, issued=issued(imp))
    assert not d.request_token and d.secret is None and d.status is None and not d.events
    assert d.requeue_at == pytest.approx(NOW + 800)


def test_after_restart_secret_alone_is_enough_and_token_recovered() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    d = rc.decide(imp2, secret, NOW + 10, remote=REMOTE, issued=None)
    assert d.status is None and d.secret is None and not d.request_token
    assert d.remember is not None and d.remember.token == "tok-1"
    # The Secret is then deleted: recreated from memory, no token request.
    d2 = rc.decide(imp2, None, NOW + 20, remote=REMOTE, issued=d.remember)
    assert d2.create_secret and not d2.request_token


def test_refresh_due_requests_new_token_and_emits_event() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    d = rc.decide(imp2, secret, NOW + 801, remote=REMOTE, issued=issued(imp))
    assert d.request_token
    new = issued(imp, at=NOW + 801, token="tok-2")
    d = rc.decide(imp2, secret, NOW + 801, remote=REMOTE, issued=new)
    assert not d.create_secret and d.secret["metadata"]["resourceVersion"] == "9"
    assert from_secret_data(d.secret["data"]).token == "tok-2"
    assert d.events and d.events[0][:2] == ("Normal", "TokenRefreshed")
    assert "tok-2" not in str(d.events) and "tok-2" not in str(d.status)
    # lastTransitionTime kept: Ready stayed True
    assert d.status["conditions"][0]["lastTransitionTime"] == imp2["status"]["conditions"][0]["lastTransitionTime"]


def test_edited_secret_is_repaired_from_memory() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    edited = {**secret, "data": {**secret["data"], "token": base64.b64encode(b"junk").decode()}}
    d = rc.decide(imp2, edited, NOW + 5, remote=REMOTE, issued=issued(imp))
    assert not d.request_token and d.secret is not None and not d.create_secret
    assert from_secret_data(d.secret["data"]).token == "tok-1"


def test_spec_change_needs_new_token() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    changed = {**imp2, "spec": {**imp2["spec"], "audiences": ["vault"]}}
    changed["metadata"] = {**imp2["metadata"], "generation": 2}
    d = rc.decide(changed, secret, NOW + 5, remote=REMOTE, issued=issued(imp))
    assert d.request_token


def test_conflict_with_foreign_secret() -> None:
    imp = make_import()
    foreign = {"metadata": {"name": "imp-token", "namespace": "ns1"}, "data": {"x": "eQ=="}}
    d = rc.decide(imp, foreign, NOW, remote=REMOTE, issued=issued(imp))
    assert d.secret is None and not d.request_token
    assert d.status["conditions"][0]["reason"] == api.REASON_SECRET_CONFLICT
    assert "secrets" not in d.status
    assert d.events[0][0] == "Warning"


def test_unknown_cluster_lists_known() -> None:
    d = rc.decide(make_import(), None, NOW, remote=None, known_clusters=["a", "b"])
    cond = d.status["conditions"][0]
    assert cond["status"] == "False" and cond["reason"] == api.REASON_UNKNOWN_CLUSTER
    assert "a, b" in cond["message"]


def test_unknown_cluster_says_why_its_credentials_are_unusable() -> None:
    d = rc.decide(make_import(), None, NOW, remote=None, cluster_error="the mounted import has no file 'token'.")
    assert "cannot use the credentials of cluster cluster2: the mounted import" in d.status["conditions"][0]["message"]


def test_invalid_spec_condition() -> None:
    d = rc.decide(make_import(expirationSeconds=5), None, NOW, remote=REMOTE)
    assert d.status["conditions"][0]["reason"] == api.REASON_INVALID_SPEC
    # Same state again: nothing to write, no second Event.
    again = rc.decide({**make_import(expirationSeconds=5), "status": d.status}, None, NOW + 1, remote=REMOTE)
    assert again.status is None and not again.events


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (None, api.REASON_REMOTE_UNREACHABLE),
        (401, api.REASON_UNAUTHORIZED),
        (403, api.REASON_FORBIDDEN),
        (404, api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND),
        (422, api.REASON_INVALID_SPEC),
        (500, api.REASON_REMOTE_UNREACHABLE),
        (503, api.REASON_REMOTE_UNREACHABLE),
        (418, api.REASON_REMOTE_ERROR),
    ],
)
def test_remote_errors_map_to_reasons(code, reason) -> None:
    failure = rc.classify_remote_error(code, "boom", "cluster2", parse_spec(make_import()))
    assert failure.reason == reason
    d = rc.decide(make_import(), None, NOW, remote=REMOTE, failure=failure)
    assert d.failed and d.status["conditions"][0]["reason"] == reason
    assert d.status["conditions"][0]["status"] == "False"


def test_failed_refresh_keeps_secret_then_expires() -> None:
    imp = make_import()
    imp2, secret = converge(imp, issued(imp))
    failure = rc.classify_remote_error(None, "connection refused", "cluster2", parse_spec(imp))
    d = rc.decide(imp2, secret, NOW + 900, remote=REMOTE, failure=failure)
    assert d.secret is None and d.failed  # the last good Secret stays untouched
    assert d.status["conditions"][0]["reason"] == api.REASON_REMOTE_UNREACHABLE
    assert "until it expires" in d.status["conditions"][0]["message"]
    assert d.requeue_at == pytest.approx(NOW + 1000)
    d = rc.decide({**imp2, "status": d.status}, secret, NOW + 1001, remote=REMOTE, failure=failure)
    assert d.status["conditions"][0]["reason"] == api.REASON_TOKEN_EXPIRED


def test_recovery_after_failure_writes_ready_again() -> None:
    imp = make_import()
    failure = rc.classify_remote_error(404, "nope", "cluster2", parse_spec(imp))
    failed = rc.decide(imp, None, NOW, remote=REMOTE, failure=failure)
    imp_failed = {**imp, "status": failed.status}
    d = rc.decide(imp_failed, None, NOW + 5, remote=REMOTE, issued=issued(imp, at=NOW + 5))
    assert d.status["conditions"][0]["status"] == "True"
    assert d.status["conditions"][0]["lastTransitionTime"] == format_time(NOW + 5)


def test_status_patch_nulls_removed_fields() -> None:
    assert rc.status_patch({"a": 1, "b": 2}, {"a": 3}) == {"status": {"a": 3, "b": None}}


def test_token_response_decoding() -> None:
    token, expires = rc.decode_token_response({"status": {"token": "t", "expirationTimestamp": "2026-11-22T21:59:03Z"}})
    assert token == "t" and expires == parse_time("2026-11-22T21:59:03Z")
    with pytest.raises(ValueError):
        rc.decode_token_response({"status": {}})


def test_issued_token_repr_hides_token() -> None:
    assert "tok-1" not in repr(issued(make_import()))


# --- queue ---------------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_queue_coalesces_and_requeues_dirty_keys() -> None:
    q = WorkQueue()
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    assert q.get(timeout=0) == "a"
    q.add("a")  # while processing: not handed out twice
    assert q.get(timeout=0) == "b"
    assert q.get(timeout=0) is None
    q.done("a")
    assert q.get(timeout=0) == "a"


def test_queue_delayed_adds_with_injected_clock() -> None:
    clock = FakeClock()
    q = WorkQueue(clock=clock)
    q.add_after("a", 10)
    q.add_after("a", 5)  # earlier wins
    q.add_after("a", 50)
    assert q.get(timeout=0) is None
    clock.now += 5
    assert q.get(timeout=0) == "a"
    q.done("a")
    clock.now += 100
    assert q.get(timeout=0) is None  # the later re-adds were coalesced into the earlier one


def test_queue_backoff_doubles_and_caps_and_forgets() -> None:
    q = WorkQueue(base_delay=1, max_delay=5, clock=FakeClock())
    assert [q.add_rate_limited("k") for _ in range(5)] == [1, 2, 4, 5, 5]
    q.forget("k")
    assert q.add_rate_limited("k") == 1


def test_queue_shutdown_wakes_getters() -> None:
    import threading

    q = WorkQueue()
    got: list = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    q.shutdown()
    t.join(5)
    assert got == [None]
    q.add("x")
    assert q.get(timeout=0) is None


# --- sources from files ---
def write_mounted(root, name: str, token: str, server: str = "https://10.0.0.1:6443") -> None:
    d = root / name
    d.mkdir(exist_ok=True)
    creds = Credentials(server=server, ca_crt=CA, token=token, namespace="ns")
    for key, value in rc.to_secret_data(creds, name).items():
        (d / key).write_bytes(base64.b64decode(value))


def test_mounted_sources_are_picked_up_and_changes_reported(tmp_path) -> None:
    registry = SourceRegistry(imports_dir=str(tmp_path))
    assert registry.refresh_files() == set()
    write_mounted(tmp_path, "c2", "t1")
    assert registry.refresh_files() == {"c2"}
    source = registry.get("c2")
    assert source.origin == ORIGIN_MOUNTED and source.server == "https://10.0.0.1:6443"
    client = registry.client(source)
    assert registry.client(registry.get("c2")) is client  # cached
    assert registry.refresh_files() == set()  # nothing changed
    (tmp_path / "c2" / "token").write_text("t2-longer")
    os.utime(tmp_path / "c2" / "token", ns=(1, 1))
    assert registry.refresh_files() == {"c2"}
    assert registry.client(registry.get("c2")) is not client  # rebuilt on new credentials
    assert "t2" not in repr(registry.get("c2"))


def test_incomplete_mounted_import_is_an_error_not_a_crash(tmp_path) -> None:
    (tmp_path / "broken").mkdir()
    registry = SourceRegistry(imports_dir=str(tmp_path))
    registry.refresh_files()
    assert registry.get("broken") is None
    assert "broken" in registry.error_for("broken")


def test_kubeconfig_sources(tmp_path) -> None:
    config = {
        "clusters": [
            {
                "name": "x",
                "cluster": {"server": "https://1.2.3.4", "certificate-authority-data": base64.b64encode(CA).decode()},
            }
        ],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [
            {"name": "c2", "context": {"cluster": "x", "user": "u"}},
            {"name": "bad", "context": {"cluster": "nope"}},
        ],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    registry = SourceRegistry(source_kubeconfig=str(path))
    assert registry.refresh_files() == {"c2"}
    assert registry.get("c2").origin == ORIGIN_KUBECONFIG and registry.get("c2").ca_pem == CA
    assert registry.get("bad") is None and "bad" in registry.error_for("bad")
    client = registry.client(registry.get("c2"))
    assert client.configuration.host == "https://1.2.3.4"
    path.write_text("{not yaml: [")
    assert registry.refresh_files() == set()  # unreadable: keep what was read before
    assert registry.get("c2") is not None


def test_kubeconfig_token_file_rotation_is_a_credential_change(tmp_path) -> None:
    config = {
        "clusters": [{"name": "x", "cluster": {"server": "https://1.2.3.4", "certificate-authority": "ca.crt"}}],
        "users": [{"name": "u", "user": {"tokenFile": "token"}}],
        "contexts": [{"name": "c2", "context": {"cluster": "x", "user": "u"}}],
    }
    (tmp_path / "ca.crt").write_bytes(CA)
    (tmp_path / "token").write_text("one")
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    registry = SourceRegistry(source_kubeconfig=str(tmp_path / "kubeconfig"))
    assert registry.refresh_files() == {"c2"}
    assert registry.get("c2").ca_pem == CA
    assert registry.refresh_files() == set()
    (tmp_path / "token").write_text("two-rotated")
    assert registry.refresh_files() == {"c2"}


def test_secret_sources(tmp_path) -> None:
    registry = SourceRegistry()
    creds = Credentials(server="https://5.6.7.8", ca_crt=CA, token="tk", namespace="ns")
    secret = {
        "metadata": {"name": "c3-token", "labels": {api.IMPORT_LABEL: "c3"}},
        "data": rc.to_secret_data(creds, "c3"),
    }
    assert registry.set_secret(secret) == {"c3"}
    assert registry.set_secret(secret) == set()
    assert registry.names() == ["c3"]
    assert registry.remove_secret(secret) == {"c3"}
    assert registry.get("c3") is None
    assert registry.set_secret({"metadata": {"name": "x", "labels": {api.IMPORT_LABEL: "c4"}}, "data": {}}) == set()
    assert "lacks" in registry.error_for("c4")


# --- leader election (pure parts) ---
def test_lease_update_counts_transitions_on_change_of_hands() -> None:
    from controller.leader import LeaseView, may_acquire, read_lease, released_lease, updated_lease

    lease = updated_lease({"metadata": {"name": "l"}, "spec": {}}, "a", 15, NOW)
    assert read_lease(lease) == LeaseView(holder="a", duration=15, transitions=0, version="")
    renewed = updated_lease(lease, "a", 15, NOW + 1)
    assert renewed["spec"]["acquireTime"] == lease["spec"]["acquireTime"]
    taken = updated_lease(renewed, "b", 15, NOW + 30)
    assert read_lease(taken).transitions == 1 and taken["spec"]["acquireTime"] != lease["spec"]["acquireTime"]
    view = read_lease(taken)
    assert not may_acquire(view, "a", observed_for=1)
    assert may_acquire(view, "a", observed_for=15)
    assert may_acquire(view, "b", observed_for=0)
    released = released_lease(taken, NOW)
    assert may_acquire(read_lease(released), "a", observed_for=0)
    assert read_lease(updated_lease(released, "a", 15, NOW + 1)).transitions == 2  # after a release too
    assert read_lease({"spec": {"leaseDurationSeconds": "x", "leaseTransitions": True}}).duration == 15


# --- metrics and health endpoints ---
def test_health_server_and_metrics() -> None:
    import httpx

    from controller.metrics import HealthServer, Metrics

    metrics = Metrics()
    metrics.reconciles.labels("success").inc()
    metrics.set_expiry("a/b", 4_000_000_000)
    ready = {"value": False}
    server = HealthServer(metrics, 0, healthy=lambda: True, ready=lambda: ready["value"]).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/readyz").status_code == 503
        ready["value"] = True
        assert httpx.get(base + "/readyz").status_code == 200
        body = httpx.get(base + "/metrics").text
        assert 'kubemcsa_controller_reconciles_total{result="success"} 1.0' in body
        assert "kubemcsa_controller_seconds_to_next_expiry" in body
        assert httpx.get(base + "/nope").status_code == 404
    finally:
        server.stop()


# --- manifests ---
def test_crd_schema_matches_the_code() -> None:
    from pathlib import Path

    from controller.spec import TOKEN_TYPES

    root = Path(__file__).resolve().parent.parent / "manifests"
    crd = yaml.safe_load((root / "crd" / "serviceaccountimports.yaml").read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == api.CRD_NAME
    assert crd["spec"]["names"]["shortNames"] == [api.SHORT_NAME]
    version = crd["spec"]["versions"][0]
    assert version["name"] == api.VERSION and version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["clusterName", "namespace", "name"]
    assert tuple(spec["properties"]["tokenType"]["enum"]) == TOKEN_TYPES
    assert spec["properties"]["expirationSeconds"]["minimum"] == api.MIN_EXPIRATION_SECONDS
    assert spec["properties"]["expirationSeconds"]["default"] == api.DEFAULT_EXPIRATION_SECONDS
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Cluster", "Remote-Namespace", "Remote-Name", "Ready", "Expires", "Age"} <= columns


def test_controller_rbac_is_least_privilege() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "manifests" / "controller"
    docs = list(yaml.safe_load_all((root / "rbac.yaml").read_text()))
    verbs = {
        (group, resource): set(rule["verbs"])
        for doc in docs
        if doc["kind"] in ("ClusterRole", "Role")
        for rule in doc["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert "delete" not in verbs[("", "secrets")] and "*" not in str(docs)
    assert verbs[(api.GROUP, api.PLURAL)] == {"list", "watch"}  # from the cache only; see test_controller_e2e
    deployment = yaml.safe_load((root / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "multicluster-service-account:0.6.0"
    assert container["command"][0] == "kubemcsa-controller"


# --- garbage in the cluster never crashes a decision ---
_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(status=_junk, annotations=_junk, data=_junk, labels=_junk, owners=_junk)
def test_decide_never_crashes_on_garbage_status_or_secret(status, annotations, data, labels, owners) -> None:
    imp = {**make_import(), "status": status}
    secret = {
        "metadata": {"name": "imp-token", "annotations": annotations, "labels": labels, "ownerReferences": owners},
        "data": data,
    }
    for candidate in (
        secret,
        {**secret, "metadata": {**secret["metadata"], "ownerReferences": [{"uid": "uid-1", "controller": True}]}},
    ):
        decision = rc.decide(imp, candidate, NOW, remote=REMOTE, issued=issued(make_import()))
        if decision.secret is not None:
            assert set(decision.secret["data"]) == set(api.SECRET_KEYS)
