"""The controller's decision for an import's Argo CD cluster Secret (pure: controller.outputs.argocd)."""

from __future__ import annotations

import copy

from controller.outputs import argocd as ac
from kubemcsa.contract import api, argocd
from kubemcsa.contract.credentials import Credentials, to_secret_data
from kubemcsa.contract.spec import parse_spec

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SERVER = "https://10.0.0.2:6443"


def make_import(argocd_spec: dict | None = None, uid: str = "uid-1") -> dict:
    spec = {"clusterName": "cluster2", "namespace": "default", "name": "pod-lister"}
    if argocd_spec is not None:
        spec["argoCD"] = argocd_spec
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "imp", "namespace": "argocd", "uid": uid, "generation": 1},
        "spec": spec,
    }


def import_secret(token: str) -> dict:
    creds = Credentials(server=SERVER, ca_crt=CA, token=token, namespace="default")
    return {"metadata": {"name": "imp-token", "namespace": "argocd"}, "data": to_secret_data(creds, "cluster2")}


def stored(secret: dict, rv: str = "7") -> dict:
    """The Secret as the API server returns it (with a resourceVersion)."""
    result = copy.deepcopy(secret)
    result["metadata"]["resourceVersion"] = rv
    return result


def assess(imp: dict, main: dict | None, existing: dict | None) -> ac.ArgoCDAction:
    return ac.assess_argocd_secret(imp, parse_spec(imp), main, existing)


def test_an_import_with_argocd_gets_argo_cds_secret_in_its_own_namespace():
    imp = make_import({"name": "prod-eu"})
    action = assess(imp, import_secret("tok-1"), None)
    assert action.create and action.delete is None
    secret = action.write
    assert secret["metadata"]["name"] == "imp-argocd"
    assert secret["metadata"]["namespace"] == "argocd"
    assert secret["metadata"]["labels"] == {argocd.SECRET_TYPE_LABEL: "cluster", api.IMPORT_LABEL: "imp"}
    owner = secret["metadata"]["ownerReferences"]
    assert owner == [
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": "imp",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert set(secret["data"]) == {"name", "server", "config"}
    decoded = argocd.read_cluster_secret_data(secret["data"])
    assert (decoded.name, decoded.server, decoded.bearer_token, decoded.ca_pem) == ("prod-eu", SERVER, "tok-1", CA)
    assert action.condition["status"] == "True" and action.condition["reason"] == ac.REASON_WRITTEN


def test_steady_state_writes_nothing():
    imp = make_import({})
    written = stored(assess(imp, import_secret("tok-1"), None).write)
    again = assess(imp, import_secret("tok-1"), written)
    assert again.write is None and again.delete is None
    assert again.condition["status"] == "True"


def test_a_new_token_rewrites_the_secret_and_keeps_others_labels_and_annotations():
    imp = make_import({})
    written = stored(assess(imp, import_secret("tok-1"), None).write)
    written["metadata"]["labels"]["team"] = "platform"  # Argo CD's ApplicationSet cluster generator reads labels
    written["metadata"]["annotations"] = {"note": "kept"}
    action = assess(imp, import_secret("tok-2"), written)
    assert not action.create
    assert action.write["metadata"]["resourceVersion"] == "7"
    assert action.write["metadata"]["labels"]["team"] == "platform"
    assert action.write["metadata"]["annotations"] == {"note": "kept"}
    assert argocd.read_cluster_secret_data(action.write["data"]).bearer_token == "tok-2"


def test_changing_argocd_settings_rewrites_without_a_new_token():
    written = stored(assess(make_import({}), import_secret("tok-1"), None).write)
    action = assess(make_import({"name": "renamed", "namespaces": ["a"]}), import_secret("tok-1"), written)
    decoded = argocd.read_cluster_secret_data(action.write["data"])
    assert (decoded.name, decoded.namespaces, decoded.bearer_token) == ("renamed", ("a",), "tok-1")


def test_edits_to_argo_cds_keys_or_label_are_undone():
    imp = make_import({})
    written = stored(assess(imp, import_secret("tok-1"), None).write)
    edited = copy.deepcopy(written)
    edited["data"]["server"] = "aHR0cHM6Ly9ldmls"
    assert assess(imp, import_secret("tok-1"), edited).write["data"] == written["data"]
    unlabelled = copy.deepcopy(written)
    del unlabelled["metadata"]["labels"][argocd.SECRET_TYPE_LABEL]
    assert assess(imp, import_secret("tok-1"), unlabelled).write["metadata"]["labels"][argocd.SECRET_TYPE_LABEL]


def test_removing_argocd_deletes_our_secret_only():
    written = stored(assess(make_import({}), import_secret("tok-1"), None).write)
    action = assess(make_import(None), import_secret("tok-1"), written)
    assert action.delete is written and action.write is None and action.condition is None
    foreign = {"metadata": {"name": "imp-argocd", "namespace": "argocd", "resourceVersion": "3"}, "data": {}}
    assert assess(make_import(None), import_secret("tok-1"), foreign) == ac.ArgoCDAction()
    assert assess(make_import(None), import_secret("tok-1"), None) == ac.ArgoCDAction()


def test_a_foreign_secret_of_that_name_is_left_alone_and_reported():
    foreign = {
        "metadata": {
            "name": "imp-argocd",
            "namespace": "argocd",
            "resourceVersion": "3",
            # Owned by another import of the same name that was deleted and re-created: not ours either.
            "ownerReferences": [{"uid": "uid-old", "controller": True, "kind": api.KIND, "name": "imp"}],
        },
        "data": {},
    }
    action = assess(make_import({}), import_secret("tok-1"), foreign)
    assert action.write is None and action.delete is None
    assert action.condition["status"] == "False"
    assert action.condition["reason"] == api.REASON_SECRET_CONFLICT
    assert "imp-argocd" in action.condition["message"] and "tok-1" not in action.condition["message"]


def test_no_token_yet_writes_nothing_and_says_so_and_a_lost_token_keeps_the_last_good_secret():
    imp = make_import({})
    waiting = assess(imp, None, None)
    assert waiting.write is None and waiting.condition["reason"] == ac.REASON_WAITING
    written = stored(assess(imp, import_secret("tok-1"), None).write)
    emptied = import_secret("")
    kept = assess(imp, emptied, written)
    assert kept.write is None and kept.delete is None and kept.condition["status"] == "True"


def test_an_invalid_spec_touches_nothing():
    imp = make_import({})
    written = stored(assess(imp, import_secret("tok-1"), None).write)
    assert ac.assess_argocd_secret(imp, None, import_secret("tok-2"), written) == ac.ArgoCDAction(report=False)


def test_a_deleted_object_reads_as_gone_until_the_informer_says_so():
    from controller.runtime.writes import RecentWrites

    now = [0.0]
    writes = RecentWrites(ttl=30, clock=lambda: now[0])
    key = ("argocd", "imp-argocd")
    cached = {"metadata": {"resourceVersion": "7"}}
    writes.deleted(key)
    assert writes.get(key, cached) is None  # the cache still holds it: no second delete
    writes.seen(key, cached)  # an event for the old version does not bring it back
    assert writes.get(key, cached) is None
    writes.forget(key)  # the informer's DELETED event
    assert writes.get(key, cached) is cached
    writes.deleted(key)
    now[0] += 31  # and a missed event only lasts the ttl
    assert writes.get(key, cached) is cached


def test_a_federated_import_gets_an_exec_plugin_reading_its_projected_token_not_a_token():
    from kubemcsa.contract.credentials import federated_secret_data

    imp = make_import({"name": "prod-eu"})
    imp["spec"] = {"clusterName": "cluster2", "namespace": "default", "tokenType": "Federated", "argoCD": {}}
    federated = {
        "metadata": {"name": "imp-token", "namespace": "argocd"},
        "data": federated_secret_data(SERVER, CA, "default", "cluster2"),
    }
    action = assess(imp, federated, None)
    decoded = argocd.read_cluster_secret_data(action.write["data"])
    assert decoded.bearer_token is None and decoded.server == SERVER and decoded.ca_pem == CA
    exec_config = decoded.config["execProviderConfig"]
    assert exec_config["args"][-1] == "/var/run/secrets/admiralty.io/serviceaccountimports/imp/token"
    # The import's Secret is not written yet: nothing to point Argo CD at.
    assert assess(imp, None, None).condition["reason"] == ac.REASON_WAITING
