"""The controller's decisions for federated imports, without a cluster (controller/assess.py)."""

from __future__ import annotations

from typing import Any

from controller.assess import (
    Blocked,
    Federated,
    NeedsTrustCheck,
    Observation,
    Trust,
    assess,
    plan,
)
from controller.federation import service_account_of
from kubemcsa import api
from kubemcsa.federation import FederatedSource, projected_volume

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SOURCE = FederatedSource("cluster2", "https://c2.example:6443", CA, "cluster2", "cluster1:")
NOW = 1_800_000_000.0


def imp(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "fed", "namespace": "team-a", "uid": "u1", "generation": 1},
        "spec": {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated", **spec},
    }


def trust(trusted: bool = True, audience: str = "cluster2", valid_until: float = NOW + 600) -> Trust:
    username = "cluster1:system:serviceaccount:multicluster-service-account:c" if trusted else None
    return Trust(
        "cluster2", audience, username, "" if trusted else "Cluster cluster2 does not trust (401)", valid_until
    )


def observe(obj: dict[str, Any] | None = None, **kw: Any) -> Observation:
    kw.setdefault("federated", SOURCE)
    return Observation(imp=obj or imp(), secret=kw.pop("secret", None), now=NOW, **kw)


def test_an_unknown_or_broken_source_blocks_with_the_fix() -> None:
    state = assess(observe(federated=None, known_federated=("other",)))
    assert isinstance(state, Blocked) and state.reason == api.REASON_UNKNOWN_CLUSTER
    assert "known: other" in state.message and "kubemcsa federate" in state.message
    state = assess(observe(federated=None, federated_error="ConfigMap x lacks server"))
    assert isinstance(state, Blocked) and "lacks server" in state.message


def test_trust_is_asked_when_unknown_stale_or_for_another_audience() -> None:
    assert isinstance(assess(observe()), NeedsTrustCheck)
    assert isinstance(assess(observe(trust=trust(valid_until=NOW))), NeedsTrustCheck)
    need = assess(observe(imp(audiences=["other"]), trust=trust()))
    assert isinstance(need, NeedsTrustCheck) and need.audience == "other"
    assert isinstance(assess(observe(trust=trust())), Federated)


def test_trusted_writes_four_keys_and_ready_with_the_remote_user_then_nothing() -> None:
    obs = observe(trust=trust())
    state = assess(obs)
    assert isinstance(state, Federated)
    writes = plan(obs, state)
    (secret,) = writes.secrets
    assert secret.create and sorted(secret.body["data"]) == sorted(api.FEDERATED_SECRET_KEYS)
    assert writes.status is not None and writes.requeue_at == NOW + 600
    assert writes.status["remoteUser"] == "cluster1:system:serviceaccount:team-a:<service-account>"
    (ready,) = writes.status["conditions"]
    assert (ready["status"], ready["reason"]) == ("True", api.REASON_FEDERATED)
    assert not writes.events
    # The next pass sees what was written: nothing to do.
    written = {**secret.body, "metadata": {**secret.body["metadata"]}}
    again = observe({**imp(), "status": writes.status}, trust=trust(), secret=written)
    assert plan(again, assess(again)).secrets == [] and plan(again, assess(again)).status is None


def test_not_trusted_keeps_the_secret_says_how_to_fix_and_warns_once() -> None:
    obs = observe(trust=trust(trusted=False, valid_until=NOW + 15))
    writes = plan(obs, assess(obs))
    assert writes.secrets and writes.requeue_at == NOW + 15 and not writes.retry
    (ready,) = writes.status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", api.REASON_FEDERATION_NOT_TRUSTED)
    assert "kubemcsa federate" in ready["message"] and "turns Ready by itself" in ready["message"]
    assert [e[:2] for e in writes.events] == [("Warning", api.REASON_FEDERATION_NOT_TRUSTED)]
    again = observe({**imp(), "status": writes.status}, trust=trust(trusted=False, valid_until=NOW + 15))
    assert plan(again, assess(again)).events == []


def test_a_foreign_secret_of_that_name_is_a_conflict() -> None:
    foreign = {"metadata": {"name": "fed-token", "namespace": "team-a"}, "data": {}}
    state = assess(observe(trust=trust(), secret=foreign))
    assert isinstance(state, Blocked) and state.reason == api.REASON_SECRET_CONFLICT


def test_the_projected_volume_has_the_four_keys_and_the_token() -> None:
    volume = projected_volume("sai-fed", "fed-token", "cluster2", 3600)
    secret, token = volume["projected"]["sources"]
    assert [i["key"] for i in secret["secret"]["items"]] == list(api.FEDERATED_SECRET_KEYS)
    assert token == {"serviceAccountToken": {"path": "token", "audience": "cluster2", "expirationSeconds": 3600}}


def test_service_account_of_a_user_name() -> None:
    assert service_account_of("system:serviceaccount:ns:sa") == ("ns", "sa")
    assert service_account_of("admin") is None
    assert service_account_of("system:serviceaccount:ns") is None


def test_switching_an_import_to_federated_drops_the_token_from_its_secret() -> None:
    old = {
        "metadata": {
            "name": "fed-token",
            "namespace": "team-a",
            "resourceVersion": "7",
            "ownerReferences": [{"apiVersion": api.API_VERSION, "kind": api.KIND, "name": "fed", "uid": "u1",
                                 "controller": True}],
        },
        "data": {key: "eA==" for key in api.SECRET_KEYS},
    }  # fmt: skip
    obs = observe({**imp(), "status": {"expirationTimestamp": "2027-01-01T00:00:00Z"}}, trust=trust(), secret=old)
    writes = plan(obs, assess(obs))
    (secret,) = writes.secrets
    assert not secret.create and secret.body["metadata"]["resourceVersion"] == "7"
    assert api.KEY_TOKEN not in secret.body["data"]
    assert "expirationTimestamp" not in writes.status
