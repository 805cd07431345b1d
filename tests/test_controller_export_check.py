"""The controller's export check and credential trust, as pure functions (no cluster)."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from controller import assess as ca
from controller import model
from controller import plan as planning
from controller.source_clusters import is_source_credential
from kubemcsa.client.tokens import consumer_of_token
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, to_secret_data
from kubemcsa.contract.imports import ImportToken, IssuedToken, import_secret, inputs_hash
from kubemcsa.contract.spec import parse_spec

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
REMOTE = model.Remote(cluster_name="cluster2", server="https://127.0.0.1:6443", ca_pem=CA)
NOW = 1_800_000_000.0
SYSTEM = api.SYSTEM_NAMESPACE


def make_import(ns: str = "team-a", **spec) -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "imp", "namespace": ns, "uid": "uid-1", "generation": 1},
        "spec": {"clusterName": "cluster2", "namespace": "team-x", "name": "bot", **spec},
    }


def exported(export_to: str = "cluster1/team-a", uid: str = "sa-1") -> dict:
    return {
        "metadata": {
            "name": "bot",
            "namespace": "team-x",
            "uid": uid,
            "labels": {api.EXPORTED_LABEL: "true"},
            "annotations": {api.EXPORT_TO_ANNOTATION: export_to},
        }
    }


def observe(imp: dict, secret: dict | None = None, **export) -> model.Observation:
    view = model.ExportView("cluster1", synced=True, **export)
    return model.Observation(imp, secret, NOW, source=REMOTE, export=view)


def a_secret(imp: dict, uid: str | None) -> dict:
    creds = Credentials(server=REMOTE.server, ca_crt=CA, token="tok", namespace="team-x")
    token = ImportToken(
        creds, IssuedToken("tok", NOW - 10, NOW + 3600), inputs_hash(parse_spec(imp), REMOTE.server, CA, uid)
    )
    return import_secret(imp, token, "cluster2")


def test_an_exported_account_needs_a_token_for_its_uid() -> None:
    state = ca.assess(observe(make_import(), service_account=exported()))
    assert isinstance(state, model.NeedsToken) and state.remote_uid == "sa-1"


def test_a_secret_for_the_same_uid_is_current_and_another_uid_needs_a_new_token() -> None:
    imp = make_import()
    secret = a_secret(imp, "sa-1")
    assert isinstance(ca.assess(observe(imp, secret, service_account=exported())), model.HasToken)
    state = ca.assess(observe(imp, secret, service_account=exported(uid="sa-2")))
    assert isinstance(state, model.NeedsToken) and state.remote_uid == "sa-2"


def test_not_exported_here_withdraws_the_token_once_and_says_so_the_same_way() -> None:
    imp = make_import(ns="team-b")
    secret = a_secret(imp, "sa-1")
    obs = observe(imp, secret, service_account=exported())
    state = ca.assess(obs)
    assert isinstance(state, model.Blocked) and state.withdraw and not state.retry
    assert state.reason == api.REASON_NOT_EXPORTED
    writes = planning.plan(obs, state)
    (write,) = writes.secrets
    assert api.KEY_TOKEN not in write.body["data"] and api.KEY_CONFIG not in write.body["data"]
    assert write.body["data"][api.KEY_SERVER] == secret["data"][api.KEY_SERVER]
    assert writes.forget and writes.events and writes.events[0][1] == api.REASON_NOT_EXPORTED
    assert "secrets" not in writes.status
    # The next pass sees the stripped Secret: nothing to write, and the same condition (no second event).
    stored = {**writes.status}
    after = model.Observation({**imp, "status": stored}, write.body, NOW + 1, source=REMOTE, export=obs.export)
    again = planning.plan(after, ca.assess(after))
    assert again.secrets == [] and again.status is None and again.events == []


def test_deleted_unknown_consumer_and_unsynced_watch() -> None:
    missing = ca.assess(observe(make_import(), exists=False))
    assert missing.reason == api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND and missing.withdraw
    assert ca.assess(observe(make_import(), exists=True)).reason == api.REASON_NOT_EXPORTED
    unknown = model.Observation(make_import(), None, NOW, source=REMOTE, export=model.ExportView(None, synced=True))
    assert "--cluster-name" in ca.assess(unknown).message
    cold = model.ExportView("cluster1", synced=False, problem="cluster cluster2 is unreachable")
    state = ca.assess(model.Observation(make_import(), None, NOW, source=REMOTE, export=cold))
    assert state.reason == api.REASON_REMOTE_UNREACHABLE and state.retry and not state.withdraw
    # No view at all is not a pass: the check fails closed.
    assert isinstance(ca.assess(model.Observation(make_import(), None, NOW, source=REMOTE)), model.Blocked)


def test_only_the_controllers_own_credential_import_is_exempt() -> None:
    own = model.Observation(
        make_import(SYSTEM, namespace=SYSTEM, name="cluster1"), None, NOW, source=REMOTE, export_exempt=True
    )
    assert isinstance(ca.assess(own), model.NeedsToken)


def fake_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_the_consumer_name_comes_from_a_bootstrap_token() -> None:
    assert consumer_of_token(fake_jwt({"sub": f"system:serviceaccount:{SYSTEM}:cluster1"})) == "cluster1"
    assert consumer_of_token(fake_jwt({"sub": "system:serviceaccount:default:cluster1"})) is None
    assert consumer_of_token(fake_jwt({"sub": f"system:serviceaccount:{SYSTEM}:Bad_Name"})) is None
    assert consumer_of_token("not-a-jwt") is None


@given(st.text(max_size=200))
def test_reading_any_token_never_fails(token: str) -> None:
    consumer_of_token(token)


def credential_secret(name: str, owner_uid: str | None, secret_name: str | None = None) -> dict:
    meta: dict = {"name": secret_name or api.secret_name_for_import(name), "namespace": SYSTEM}
    meta["labels"] = {api.IMPORT_LABEL: name}
    if owner_uid:
        meta["ownerReferences"] = [{"kind": api.KIND, "name": name, "uid": owner_uid, "controller": True}]
    creds = Credentials(server="https://x", ca_crt=CA, token="t", namespace=SYSTEM)
    return {"metadata": meta, "data": to_secret_data(creds, name)}


def test_a_credential_is_a_secret_its_system_import_controls() -> None:
    imp = {"metadata": {"name": "cluster2", "namespace": SYSTEM, "uid": "u1"}}
    assert is_source_credential(credential_secret("cluster2", "u1"), imp, SYSTEM)
    assert not is_source_credential(credential_secret("cluster2", None), imp, SYSTEM)  # anyone's Secret
    assert not is_source_credential(credential_secret("cluster2", "u2"), imp, SYSTEM)  # another import's UID
    assert not is_source_credential(credential_secret("cluster2", "u1", "look-alike"), imp, SYSTEM)
    assert not is_source_credential(credential_secret("cluster2", "u1"), None, SYSTEM)  # no such import
    elsewhere = {"metadata": {"name": "cluster2", "namespace": "team-a", "uid": "u1"}}
    assert not is_source_credential(credential_secret("cluster2", "u1"), elsewhere, SYSTEM)
    going = {"metadata": {**imp["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert not is_source_credential(credential_secret("cluster2", "u1"), going, SYSTEM)


def test_without_its_own_name_the_controller_still_honours_a_star_cluster_export() -> None:
    # Once: refused NotExported whenever --cluster-name was not given, although `*` matches any consumer name.
    unnamed = model.ExportView(None, synced=True, service_account=exported("*/team-a"))
    state = ca.assess(model.Observation(make_import(), None, NOW, source=REMOTE, export=unnamed))
    assert isinstance(state, model.NeedsToken) and state.remote_uid == "sa-1"
    named = model.ExportView(None, synced=True, service_account=exported("cluster1/team-a"))
    refused = ca.assess(
        model.Observation(make_import(), a_secret(make_import(), "sa-1"), NOW, source=REMOTE, export=named)
    )
    assert isinstance(refused, model.Blocked) and refused.reason == api.REASON_NOT_EXPORTED
    assert "--cluster-name" in refused.message and not refused.withdraw  # a misconfiguration, not a withdrawal


def test_an_oversized_export_to_is_refused_with_an_event_naming_the_cap() -> None:
    from kubemcsa.contract.export_policy import MAX_EXPORT_TO_LENGTH

    huge = ", ".join(f"cluster1/ns-{i}" for i in range(100_000))
    obs = observe(make_import(), service_account=exported(huge))
    state = ca.assess(obs)
    assert isinstance(state, model.Blocked) and state.reason == api.REASON_NOT_EXPORTED
    writes = planning.plan(obs, state)
    (event,) = writes.events
    assert event[0] == "Warning" and str(MAX_EXPORT_TO_LENGTH) in event[2]
    assert writes.status["conditions"][0]["message"] == event[2]
