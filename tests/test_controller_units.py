"""Unit tests of the controller's pure parts: spec validation, decisions, the work queue, file sources."""

from __future__ import annotations

import base64
import copy
import os
import time
from collections.abc import Callable

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from controller import assess as ca
from controller import conditions, model
from controller import plan as planning
from controller.runtime.queue import WorkQueue
from controller.runtime.writes import RecentWrites
from controller.source_clusters import ORIGIN_KUBECONFIG, ORIGIN_MOUNTED
from controller.sources import SourceRegistry
from kubemcsa.contract import api, imports
from kubemcsa.contract.credentials import Credentials, CredentialsError, from_secret_data, to_secret_data
from kubemcsa.contract.imports import ImportToken, IssuedToken, inputs_hash
from kubemcsa.contract.spec import TOKEN_TYPE_LEGACY, SpecError, parse_spec
from kubemcsa.contract.timefmt import format_time, parse_time
from kubemcsa_testing.wait import wait_for

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
REMOTE = model.Remote(cluster_name="cluster2", server="https://127.0.0.1:6443", ca_pem=CA)
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


# --- decisions: assess, then plan (as the reconciler calls them) ------------------------------------------------
def held_token(imp: dict, at: float = NOW, lifetime: float = 1000, token: str = "tok-1") -> ImportToken:
    creds = Credentials(server=REMOTE.server, ca_crt=CA, token=token, namespace="default")
    issued = IssuedToken(token, at, at + lifetime)
    return ImportToken(creds, issued, inputs_hash(parse_spec(imp), REMOTE.server, CA))


def decide(
    imp: dict,
    secret: dict | None,
    now: float,
    *,
    new: ImportToken | None = None,
    source: model.Remote | None = REMOTE,
    **observed,
) -> tuple[model.Assessment, model.Writes | None]:
    """The pure decision: assess, then plan with `new` if a token is needed (None: stop at NeedsToken). What the
    reconciler does around it (the token request and its failures, the writes) is tested on the real Reconciler
    in tests/test_reconciler_table.py."""
    observed.setdefault("export_exempt", True)  # exports have their own tests (tests/test_controller_exports.py)
    observation = model.Observation(imp, secret, now, source=source, **observed)
    state = ca.assess(observation)
    if isinstance(state, model.NeedsToken):
        if new is None:
            return state, None
        state = model.HasToken(state.spec, new)
    return state, planning.plan(observation, state)


def converge(imp: dict, token: ImportToken, now: float = NOW) -> tuple[dict, dict]:
    """Apply the writes for a fresh import: returns (import with status, Secret) as the server would store them."""
    _, writes = decide(imp, None, now, new=token)
    assert writes is not None and len(writes.secrets) == 1 and writes.secrets[0].create and writes.status is not None
    secret = dict(writes.secrets[0].body)
    secret["metadata"] = {**secret["metadata"], "resourceVersion": "9"}
    return {**imp, "status": writes.status}, secret


def test_new_import_needs_a_token_then_writes_secret_and_status() -> None:
    imp = make_import()
    state, writes = decide(imp, None, NOW)
    assert isinstance(state, model.NeedsToken) and writes is None
    _, writes = decide(imp, None, NOW, new=held_token(imp))
    (write,) = writes.secrets
    assert write.create
    secret = write.body
    assert secret["metadata"]["name"] == api.secret_name_for_import("imp")
    assert secret["metadata"]["labels"][api.IMPORT_LABEL] == "imp"
    owner = secret["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "uid-1" and owner["controller"] and owner["blockOwnerDeletion"]
    assert set(secret["data"]) == set(api.SECRET_KEYS)
    assert from_secret_data(secret["data"]).token == "tok-1"
    ready = writes.status["conditions"][0]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "True", api.REASON_TOKEN_ISSUED)
    assert writes.status["secrets"] == [{"name": "imp-token"}]
    assert writes.status["observedGeneration"] == 1
    assert writes.status["expirationTimestamp"] == format_time(NOW + 1000)
    assert writes.requeue_at == pytest.approx(NOW + 800)
    assert not writes.events  # no Event on first issue: at most 3 API calls per new import


def test_steady_state_writes_nothing() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    state, writes = decide(imp2, secret, NOW + 10, held=held_token(imp))
    assert isinstance(state, model.HasToken) and state.current
    assert not writes.secrets and writes.status is None and not writes.events
    assert writes.requeue_at == pytest.approx(NOW + 800)


def test_after_restart_the_secret_alone_is_enough_and_its_token_is_held() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    _, writes = decide(imp2, secret, NOW + 10)
    assert writes.status is None and not writes.secrets
    assert writes.remember is not None and writes.remember.credentials.token == "tok-1"
    # The Secret is then deleted: recreated from memory, no token request.
    state, writes = decide(imp2, None, NOW + 20, held=writes.remember)
    assert isinstance(state, model.HasToken) and not state.current
    assert writes.secrets[0].create


def test_refresh_due_needs_a_new_token_and_emits_an_event() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    state, _ = decide(imp2, secret, NOW + 801, held=held_token(imp))
    assert isinstance(state, model.NeedsToken)
    new = held_token(imp, at=NOW + 801, token="tok-2")
    _, writes = decide(imp2, secret, NOW + 801, held=held_token(imp), new=new)
    (write,) = writes.secrets
    assert not write.create and write.body["metadata"]["resourceVersion"] == "9"
    assert from_secret_data(write.body["data"]).token == "tok-2"
    assert writes.events and writes.events[0][:2] == ("Normal", "TokenRefreshed")
    assert "tok-2" not in str(writes.events) and "tok-2" not in str(writes.status)
    # lastTransitionTime kept: Ready stayed True
    assert writes.status["conditions"][0]["lastTransitionTime"] == imp2["status"]["conditions"][0]["lastTransitionTime"]


def test_edited_secret_is_repaired_from_memory() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    edited = {**secret, "data": {**secret["data"], "token": base64.b64encode(b"junk").decode()}}
    state, writes = decide(imp2, edited, NOW + 5, held=held_token(imp))
    assert isinstance(state, model.HasToken)
    (write,) = writes.secrets
    assert not write.create and from_secret_data(write.body["data"]).token == "tok-1"


# --- the Secret cache's form: decisions on it are the decisions on the whole Secret -------------------------------
def cache_form(secret: dict, system_namespace: str = api.SYSTEM_NAMESPACE) -> dict:
    return imports.cache_form_of_secret(copy.deepcopy(secret), system_namespace)


def test_the_cache_keeps_an_import_secret_without_its_kubeconfig_and_decides_the_same() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    cached = cache_form(secret)
    assert cached["data"][api.KEY_CONFIG] == cached["data"][api.KEY_TOKEN] == ""
    assert set(cached["data"]) == set(api.SECRET_KEYS) and cached[imports.CACHED_TOKEN] == "tok-1"
    state, writes = decide(imp2, cached, NOW + 10)  # after a restart: the cache alone is enough
    assert isinstance(state, model.HasToken) and state.current and not writes.secrets
    # The memory of the token is the cache's very string: one copy of each token.
    assert writes.remember is not None and writes.remember.credentials.token is cached[imports.CACHED_TOKEN]
    # A refresh written from it holds a whole kubeconfig: nothing written is built from the cached data.
    _, writes = decide(imp2, cached, NOW + 801, new=held_token(imp, at=NOW + 801, token="tok-2"))
    config = base64.b64decode(writes.secrets[0].body["data"][api.KEY_CONFIG]).decode()
    assert "tok-2" in config and writes.secrets[0].body["metadata"]["resourceVersion"] == "9"


def test_the_cache_slims_only_the_imports_own_owner_reference_and_a_rewrite_keeps_the_others_whole() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "name": "keeper", "uid": "u-2", "blockOwnerDeletion": True}
    secret["metadata"]["ownerReferences"] = [*secret["metadata"]["ownerReferences"], theirs]
    cached = cache_form(secret)
    own, kept = cached["metadata"]["ownerReferences"]
    assert own == {"kind": api.KIND, "name": "imp", "uid": "uid-1", "controller": True} and kept == theirs
    assert imports.is_controlled_by(cached, "uid-1")
    _, writes = decide(imp2, cached, NOW + 801, new=held_token(imp, at=NOW + 801, token="tok-2"))
    refs = writes.secrets[0].body["metadata"]["ownerReferences"]
    assert refs[0]["apiVersion"] == api.API_VERSION and refs[0]["blockOwnerDeletion"] is True and theirs in refs
    assert len(refs) == 2


def test_the_import_cache_drops_only_what_nothing_reads() -> None:
    imp = make_import()
    imp["metadata"]["creationTimestamp"] = "2026-12-03T06:56:19Z"
    cached = imports.cache_form_of_import(copy.deepcopy(imp))
    del imp["metadata"]["creationTimestamp"]
    assert cached == imp


@pytest.mark.parametrize("edit", ["config", "token", "drop-config"])
def test_an_edit_of_any_key_shows_in_the_cache_form(edit: str) -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    if edit == "drop-config":
        del secret["data"][api.KEY_CONFIG]
    else:
        secret["data"][edit] = base64.b64encode(b"edited").decode()
    state, writes = decide(imp2, cache_form(secret), NOW + 10, held=held_token(imp))
    assert isinstance(state, model.HasToken) and not state.current
    (write,) = writes.secrets
    assert from_secret_data(write.body["data"]).token == "tok-1"


def test_a_forged_cached_hash_is_replaced_by_the_one_the_cache_computes() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    secret["data"][api.KEY_TOKEN] = base64.b64encode(b"attacker").decode()
    # Someone who may edit the Secret writes the hash of the unedited data and a token of their choosing beside
    # it (an API server drops such fields; the cache form ignores them all the same).
    secret[imports.CACHED_DATA_HASH] = secret["metadata"]["annotations"][imports.ANNOTATION_DATA_HASH]
    secret[imports.CACHED_TOKEN] = "tok-1"
    state, writes = decide(imp2, cache_form(secret), NOW + 10, held=held_token(imp))
    assert isinstance(state, model.HasToken) and not state.current
    assert from_secret_data(writes.secrets[0].body["data"]).token == "tok-1"
    system = copy.deepcopy(secret)
    system["metadata"]["namespace"] = api.SYSTEM_NAMESPACE  # not slimmed: the forged fields are dropped all the same
    assert imports.CACHED_DATA_HASH not in cache_form(system) and imports.CACHED_TOKEN not in cache_form(system)


def test_the_cache_keeps_source_credentials_and_other_secrets_whole() -> None:
    imp = make_import()
    _, secret = converge(imp, held_token(imp))
    system = copy.deepcopy(secret)
    system["metadata"]["namespace"] = api.SYSTEM_NAMESPACE  # a source credential: its pin hashes the full data
    assert cache_form(system) == system
    argocd = copy.deepcopy(secret)
    argocd["metadata"]["name"] = api.argocd_secret_name_for_import("imp")  # an output's Secret, its own `config`
    assert cache_form(argocd) == argocd
    unlabelled = copy.deepcopy(secret)
    unlabelled["metadata"]["labels"] = {}
    assert cache_form(unlabelled) == unlabelled
    for junk in ({}, {"data": None}, {"data": "x", "metadata": []}, {"metadata": {"labels": {api.IMPORT_LABEL: 3}}}):
        assert cache_form(junk) == junk


def read_or_why(secret: dict, require_token: bool) -> object:
    try:
        return imports.secret_credentials(secret, require_token=require_token)
    except CredentialsError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.dictionaries(
        st.sampled_from([*api.SECRET_KEYS, "extra"]), st.one_of(st.none(), st.text(max_size=8)), max_size=4
    )
)
def test_secret_is_current_on_the_cache_form_is_secret_is_current_on_the_secret(edits: dict) -> None:
    imp = make_import()
    _, secret = converge(imp, held_token(imp))
    for key, value in edits.items():
        if value is None:
            secret["data"].pop(key, None)
        else:
            secret["data"][key] = value
    wanted = inputs_hash(parse_spec(imp), REMOTE.server, CA)
    cached = cache_form(secret)
    assert imports.secret_token(cached) == imports.secret_token(secret)
    for require_token in (True, False):
        assert read_or_why(cached, require_token) == read_or_why(secret, require_token)
    for now in (NOW + 10, NOW + 900):
        whole = imports.secret_is_current(secret, wanted, now)
        assert imports.secret_is_current(cached, wanted, now) == whole
        assert imports.federated_secret_is_current(cache_form(secret), wanted) == (
            imports.federated_secret_is_current(secret, wanted)
        )


def test_spec_change_needs_new_token() -> None:
    imp = make_import()
    imp2, secret = converge(imp, held_token(imp))
    changed = {**imp2, "spec": {**imp2["spec"], "audiences": ["vault"]}}
    changed["metadata"] = {**imp2["metadata"], "generation": 2}
    state, _ = decide(changed, secret, NOW + 5, held=held_token(imp))
    assert isinstance(state, model.NeedsToken)


def test_conflict_with_foreign_secret() -> None:
    imp = make_import()
    foreign = {"metadata": {"name": "imp-token", "namespace": "ns1"}, "data": {"x": "eQ=="}}
    state, writes = decide(imp, foreign, NOW, held=held_token(imp))
    assert isinstance(state, model.Blocked) and not writes.secrets
    assert writes.status["conditions"][0]["reason"] == api.REASON_SECRET_CONFLICT
    assert "secrets" not in writes.status
    assert writes.events[0][0] == "Warning"


def test_unknown_cluster_lists_known() -> None:
    _, writes = decide(make_import(), None, NOW, source=None, known_clusters=("a", "b"))
    cond = writes.status["conditions"][0]
    assert cond["status"] == "False" and cond["reason"] == api.REASON_UNKNOWN_CLUSTER
    assert "a, b" in cond["message"]


def test_unknown_cluster_says_why_its_credentials_are_unusable() -> None:
    _, writes = decide(make_import(), None, NOW, source=None, cluster_error="the mounted import has no file 'token'.")
    message = writes.status["conditions"][0]["message"]
    assert "cannot use the credentials of cluster cluster2: the mounted import" in message


def test_invalid_spec_condition() -> None:
    _, writes = decide(make_import(expirationSeconds=5), None, NOW)
    assert writes.status["conditions"][0]["reason"] == api.REASON_INVALID_SPEC
    # Same state again: nothing to write, no second Event.
    _, again = decide({**make_import(expirationSeconds=5), "status": writes.status}, None, NOW + 1)
    assert again.status is None and not again.events


def test_a_new_blocking_check_is_one_function() -> None:
    """How another reason to block an import is added: a check in CHECKS (here for one test only)."""

    def not_exported(obs: model.Observation, spec) -> model.Blocked | None:
        return model.Blocked("NotExported", f"{spec.name} is not exported.", spec=spec)

    ca.CHECKS.append(not_exported)
    try:
        state, writes = decide(make_import(), None, NOW)
    finally:
        ca.CHECKS.remove(not_exported)
    assert isinstance(state, model.Blocked) and writes.status["conditions"][0]["reason"] == "NotExported"


def test_status_patch_nulls_removed_fields() -> None:
    assert conditions.status_patch({"a": 1, "b": 2}, {"a": 3}) == {"status": {"a": 3, "b": None}}


def test_held_token_repr_hides_token() -> None:
    assert "tok-1" not in repr(held_token(make_import()))


def test_recent_writes_stand_in_until_the_cache_shows_that_version() -> None:
    clock = FakeClock()
    writes = RecentWrites(ttl=30, clock=clock)
    key = ("ns", "x")
    cached = {"metadata": {"resourceVersion": "a"}}
    ours = {"metadata": {"resourceVersion": "b"}}
    assert writes.get(key, cached) is cached
    writes.wrote(key, ours)
    assert writes.get(key, cached) is ours
    writes.seen(key, cached)  # an older event: versions are opaque, only equality is meaningful
    assert writes.get(key, cached) is ours
    writes.seen(key, ours)
    assert writes.get(key, ours) is ours and writes.get(key, None) is None
    writes.wrote(key, ours)  # the informer delivered this version before the writer recorded it
    assert writes.get(key, None) is None
    writes.forget(key)
    writes.wrote(key, ours)
    clock.now += 31  # a re-list may skip our version: the cache is then newer anyway
    assert writes.get(key, cached) is cached


def test_only_the_echo_of_our_own_write_is_said_to_be_ours() -> None:
    # What spares a reconcile: an attacker's edit (any other version, even right after ours) must still wake it.
    clock = FakeClock()
    writes = RecentWrites(ttl=30, clock=clock)
    key = ("ns", "x")
    ours, theirs = {"metadata": {"resourceVersion": "b"}}, {"metadata": {"resourceVersion": "c"}}
    assert writes.seen(key, {"metadata": {"resourceVersion": "a"}}) is False
    writes.wrote(key, ours)
    assert writes.seen(key, ours) is True
    assert writes.seen(key, ours) is False  # a resync replays it: no longer an echo, the import looks again
    assert writes.seen(key, theirs) is False
    writes.wrote(key, {"metadata": {"resourceVersion": "d"}})
    assert writes.seen(key, {"metadata": {"resourceVersion": "e"}}) is False  # an edit before our echo came
    writes.forget(key)
    writes.wrote(key, ours)
    assert writes.seen(key, {"metadata": {}}) is False  # no version says nothing


def test_a_delivery_during_our_write_wakes_only_if_the_answer_says_it_was_not_our_version() -> None:
    # The echo often comes before the write's own answer. Whatever else comes meanwhile (an attacker's edit just
    # before ours, a version-less object, a failed write) must still wake the import, once the answer is in.
    writes = RecentWrites(ttl=30, clock=FakeClock())
    key = ("ns", "x")
    woken: list[str] = []

    def wake(why: str) -> Callable[[], None]:
        return lambda: woken.append(why)

    ours = {"metadata": {"resourceVersion": "b"}}
    with writes.writing(key) as wrote:
        writes.delivered(key, ours, wake("our echo, early"))
        assert woken == []  # held: nobody can tell yet whose version this is
        wrote(ours)
    assert woken == []
    assert writes.get(key, None) is None  # the cache already holds it: nothing stands in

    with writes.writing(key) as wrote:
        writes.delivered(key, {"metadata": {"resourceVersion": "c"}}, wake("their edit"))
        writes.delivered(key, {"metadata": {}}, wake("no version"))
        writes.delivered(key, {"metadata": {"resourceVersion": "d"}}, wake("our echo"))
        wrote({"metadata": {"resourceVersion": "d"}})
    assert woken == ["their edit", "no version"]

    woken.clear()
    with writes.writing(key):  # a conflict or an error: nothing written, every held wake-up is given
        writes.delivered(key, {"metadata": {"resourceVersion": "e"}}, wake("during a failed write"))
    assert woken == ["during a failed write"]

    woken.clear()
    with pytest.raises(RuntimeError), writes.writing(key):
        writes.delivered(key, {"metadata": {"resourceVersion": "f"}}, wake("during a crash"))
        raise RuntimeError
    assert woken == ["during a crash"]

    woken.clear()
    writes.delivered(key, {"metadata": {"resourceVersion": "g"}}, wake("no write in flight"))
    assert woken == ["no write in flight"]

    woken.clear()
    with writes.writing(key) as wrote:  # edits in a loop meanwhile: a bounded number held, the rest given at once
        for index in range(100):
            writes.delivered(key, {"metadata": {"resourceVersion": f"h{index}"}}, wake(f"edit {index}"))
        assert len(woken) == 96
        wrote({"metadata": {"resourceVersion": "ours"}})
    assert len(woken) == 100


def test_delivered_versions_are_remembered_for_seconds_not_per_object_for_good() -> None:
    clock = FakeClock()
    writes = RecentWrites(ttl=30, clock=clock, seen_seconds=5)
    for index in range(1000):
        writes.seen(("ns", f"x{index}"), {"metadata": {"resourceVersion": str(index)}})
    clock.now += 6
    writes.seen(("ns", "last"), {"metadata": {"resourceVersion": "last"}})
    assert len(writes._seen) == 1  # memory follows the event rate, not the number of objects
    late = {"metadata": {"resourceVersion": "last"}}
    writes.wrote(("ns", "last"), late)  # within the window: the cache already holds it
    assert writes.get(("ns", "last"), None) is None
    writes.wrote(("ns", "x1"), {"metadata": {"resourceVersion": "1"}})  # past it: stands in, for ttl at most
    assert writes.get(("ns", "x1"), None) is not None
    clock.now += 31
    assert writes.get(("ns", "x1"), None) is None


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
    q = WorkQueue(base_delay=1, max_delay=5, clock=FakeClock(), jitter=lambda: 1.0)
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
    for key, value in to_secret_data(creds, name).items():
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


def test_a_kubeconfig_read_short_keeps_its_clusters_until_a_second_read_agrees(tmp_path) -> None:
    """A file rewritten in place reads empty or short for a moment: its clusters stay until two reads agree."""
    cluster = {"server": "https://1.2.3.4", "certificate-authority-data": base64.b64encode(CA).decode()}
    config = {
        "clusters": [{"name": "x", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "c2", "context": {"cluster": "x", "user": "u"}}],
    }
    path = tmp_path / "kubeconfig"

    def write(text: str, seconds_ago: float = 10) -> None:  # a write that ended a while ago (SETTLE_SECONDS)
        path.write_text(text)
        os.utime(path, (time.time() - seconds_ago, time.time() - seconds_ago))

    write(yaml.safe_dump(config))
    registry = SourceRegistry(source_kubeconfig=str(path))
    assert registry.refresh_files() == {"c2"} and not registry.files_loaded()  # read, not yet seen unchanged
    assert registry.refresh_files() == set() and registry.files_loaded()
    write("", seconds_ago=0)  # just written: not settled
    assert registry.refresh_files() == set() and not registry.files_loaded()
    write(yaml.safe_dump(config))
    assert registry.refresh_files() == set() and registry.refresh_files() == set() and registry.files_loaded()
    write("")  # truncated: a write in progress
    assert registry.refresh_files() == set() and registry.get("c2") is not None
    write(yaml.safe_dump({**config, "contexts": []}))  # half written, or the context really removed
    assert registry.refresh_files() == set() and registry.get("c2") is not None
    assert registry.refresh_files() == {"c2"} and registry.get("c2") is None  # a second read agrees: gone


def test_keep_missing_once_is_a_pure_decision() -> None:
    from controller.source_clusters import SourceCluster, keep_missing_once

    def source(name: str) -> SourceCluster:
        return SourceCluster(name, ORIGIN_KUBECONFIG, "https://s", CA, name, build=lambda: None)

    before = {"a": source("a"), "b": source("b")}
    kept, errors, lost = keep_missing_once(before, {"a": source("a")}, {"b": "unusable"}, set())
    assert set(kept) == {"a", "b"} and errors == {} and lost == {"b"}
    kept, errors, lost = keep_missing_once(kept, {"a": source("a")}, {"b": "unusable"}, lost)
    assert set(kept) == {"a"} and errors == {"b": "unusable"} and lost == set()


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
        "data": to_secret_data(creds, "c3"),
    }
    assert registry.set_secret(secret) == {"c3"}
    assert registry.set_secret(secret) == set()
    assert registry.names() == ["c3"]
    assert registry.remove_secret(secret) == {"c3"}
    assert registry.get("c3") is None
    assert (
        registry.set_secret({"metadata": {"name": "c4-token", "labels": {api.IMPORT_LABEL: "c4"}}, "data": {}}) == set()
    )
    assert "lacks" in registry.error_for("c4")
    # An import's other Secrets (its Argo CD cluster Secret) are not credentials of a cluster.
    argocd_secret = {"metadata": {"name": "c3-argocd", "labels": {api.IMPORT_LABEL: "c3"}}, "data": {}}
    assert registry.set_secret(secret) == {"c3"}
    assert registry.set_secret(argocd_secret) == set() and registry.error_for("c3") is None
    assert registry.remove_secret(argocd_secret) == set() and registry.get("c3") is not None


# --- leader election (pure parts) ---
def test_lease_update_counts_transitions_on_change_of_hands() -> None:
    from controller.runtime.leader import LeaseView, may_acquire, read_lease, released_lease, updated_lease

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


def test_a_leader_that_renews_past_its_deadline_starts_a_new_term(cluster1) -> None:
    """While a renewal is overdue, is_leader reads False and the workers drop the keys they get; the renewal that
    ends the lapse must call on_started_leading again (the manager then queues every key), not carry on silently."""
    from controller.runtime.leader import LeaderElector

    calls: list[str] = []
    elector = LeaderElector(
        cluster1.admin_client(),
        "default",
        "me",
        renew_deadline=0.2,
        on_started_leading=lambda: calls.append("started"),
        on_stopped_leading=lambda: calls.append("stopped"),
    )
    elector._try_acquire_or_renew()  # one round of the elector's loop, as its thread runs it
    assert elector.is_leader and calls == ["started"]
    elector._try_acquire_or_renew()  # on time: the same term
    assert calls == ["started"]
    wait_for(lambda: not elector.is_leader, what="the renew deadline to pass without a renewal (a stalled process)")
    elector._try_acquire_or_renew()
    assert elector.is_leader and calls == ["started", "stopped", "started"]


# --- metrics and health endpoints ---
def test_health_server_and_metrics() -> None:
    import httpx

    from controller.metrics import Metrics
    from controller.runtime.health import HealthServer

    metrics = Metrics()
    metrics.reconciles.labels("success").inc()
    metrics.set_expiry("a/b", 4_000_000_000)
    ready = {"value": False}
    server = HealthServer(metrics.exposition, 0, healthy=lambda: True, ready=lambda: ready["value"]).start()
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

    from kubemcsa.contract.spec import TOKEN_TYPES

    root = Path(__file__).resolve().parent.parent / "manifests"
    crd = yaml.safe_load((root / "crd" / "serviceaccountimports.yaml").read_text())
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == api.CRD_NAME
    assert crd["spec"]["names"]["shortNames"] == [api.SHORT_NAME]
    version = crd["spec"]["versions"][0]
    assert version["name"] == api.VERSION and version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["clusterName", "namespace"]  # and name, unless Federated (a CEL rule)
    assert tuple(spec["properties"]["tokenType"]["enum"]) == TOKEN_TYPES
    assert spec["properties"]["expirationSeconds"]["minimum"] == api.MIN_EXPIRATION_SECONDS
    # The default depends on the mode (86400, or 3600 for Federated): the code applies it, the text says it.
    assert "default" not in spec["properties"]["expirationSeconds"]
    assert str(api.DEFAULT_EXPIRATION_SECONDS) in spec["properties"]["expirationSeconds"]["description"]
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
    # delete: only an import's own Argo CD Secret when spec.argoCD goes, with its uid as a precondition.
    assert verbs[("", "secrets")] == {"list", "watch", "create", "update", "delete"} and "*" not in str(docs)
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
def test_assess_and_plan_never_crash_on_garbage_status_or_secret(status, annotations, data, labels, owners) -> None:
    imp = {**make_import(), "status": status}
    secret = {
        "metadata": {"name": "imp-token", "annotations": annotations, "labels": labels, "ownerReferences": owners},
        "data": data,
    }
    for candidate in (
        secret,
        {**secret, "metadata": {**secret["metadata"], "ownerReferences": [{"uid": "uid-1", "controller": True}]}},
    ):
        _, writes = decide(imp, candidate, NOW, held=held_token(make_import()))
        for write in writes.secrets:
            assert set(write.body["data"]) == set(api.SECRET_KEYS)


def test_the_hashes_written_into_secrets_do_not_change_across_versions() -> None:
    # Recorded in every import Secret: a different value after an upgrade would ask every source for a new token
    # at once (a storm), or read every Secret as edited. Values from the first release that wrote them.
    imp = {"metadata": {"name": "i", "namespace": "n"}}
    imp["spec"] = {"clusterName": "c2", "namespace": "default", "name": "sa", "audiences": ["x", "é"]}
    assert inputs_hash(parse_spec(imp), "https://s:6443", b"CA\xff") == "7041f0fbcf090f83"
    assert inputs_hash(parse_spec(imp), "https://s:6443", b"CA\xff", "u1") == "74000fede8c0ce89"
    assert imports.data_hash({"token": "t", "ca.crt": "Y2E=", "z": "é"}) == "5ba3dc9eac2a3204"
