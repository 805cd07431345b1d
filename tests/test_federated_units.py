"""The controller's decisions for federated imports, without a cluster (controller/assess.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from controller.assess import assess
from controller.model import Blocked, Federated, NeedsTrustCheck, Observation, Trust
from controller.plan import plan
from controller.trust_checks import parse_service_account
from kubemcsa.contract import api
from kubemcsa.contract.federation import (
    FederatedSource,
    projected_volume,
    record_audiences,
    source_configmap,
    source_from_configmap,
)

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
    recorded = dataclasses.replace(SOURCE, audiences=("cluster2", "other"))  # the record allows "other" too
    need = assess(observe(imp(audiences=["other"]), trust=trust(), federated=recorded))
    assert isinstance(need, NeedsTrustCheck) and need.audience == "other"
    assert isinstance(assess(observe(trust=trust())), Federated)


@pytest.mark.parametrize(
    "audiences",
    [["https://cluster1.example"], ["cluster3"], ["garbage"], ["cluster2", "garbage"], ["other", "x" * 300]],
)
def test_an_audience_the_record_does_not_allow_blocks_without_any_trust_check(audiences: list[str]) -> None:
    """The trust check's token goes to the source: only the admin's record chooses its audience, never the import
    (this cluster's own API audience, another source's, anything). No check is asked for; the fix is given."""
    recorded = dataclasses.replace(SOURCE, audiences=("other",))
    for cached in (None, trust(audience=audiences[0])):  # not even an answer in memory lets it through
        obs = observe(imp(audiences=audiences), trust=cached, federated=recorded)
        state = assess(obs)
        assert isinstance(state, Blocked) and state.reason == api.REASON_AUDIENCE_NOT_ALLOWED == "AudienceNotAllowed"
        assert "allows the audiences cluster2, other only" in state.message
        assert "remove spec.audiences to use cluster2" in state.message
        assert "kubemcsa federate --source-context <cluster2> --audience cluster2 --audience other" in state.message
        assert len(state.message) < 600 and "x" * 65 not in state.message  # what the import chose, cut short
        writes = plan(obs, state)
        (ready,) = writes.status["conditions"]
        assert (ready["status"], ready["reason"]) == ("False", api.REASON_AUDIENCE_NOT_ALLOWED)
        assert [e[:2] for e in writes.events] == [("Warning", api.REASON_AUDIENCE_NOT_ALLOWED)]


def test_an_old_record_allows_its_one_audience_and_a_new_one_several() -> None:
    old = {"data": {"clusterName": "c2", "server": "https://c2", "ca.crt": CA.decode(), "audience": "c2",
                    "userPrefix": "c1:"}}  # fmt: skip
    assert source_from_configmap(old).allowed_audiences == ("c2",) == record_audiences(old["data"])
    new = source_configmap(dataclasses.replace(SOURCE, audiences=("cluster2", "b", "c")))
    assert new["data"]["audiences"] == "cluster2,b,c"
    assert source_from_configmap(new).allowed_audiences == ("cluster2", "b", "c") == record_audiences(new["data"])
    assert "audiences" not in source_configmap(SOURCE)["data"]  # one audience: written as before
    assert record_audiences({"audience": " ", "audiences": "a"}) == ()


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


def test_the_trust_check_identity_is_namespace_slash_name() -> None:
    assert parse_service_account("multicluster-service-account/trust") == ("multicluster-service-account", "trust")
    for bad in ("trust", "ns/", "/trust", "ns/a/b", "NS/x"):
        with pytest.raises(ValueError, match="NAMESPACE/NAME"):
            parse_service_account(bad)


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
