"""Table output of the in-memory API server: what `kubectl get` prints for custom and built-in resources."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa_testing import crd_manifest, table
from kubemcsa_testing.wait import wait_for

OBJ = {
    "metadata": {"name": "x", "creationTimestamp": "2026-11-22T20:00:00Z", "resourceVersion": "7"},
    "spec": {"clusterName": "c2", "list": [1, 2]},
    "status": {"conditions": [{"type": "Other", "status": "False"}, {"type": "Ready", "status": "True"}]},
}
NOW = 1795377600.0  # 2026-11-22T20:00:00Z


def test_jsonpath_subset():
    assert table.evaluate(OBJ, ".spec.clusterName") == "c2"
    assert table.evaluate(OBJ, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert table.evaluate(OBJ, ".spec.list[1]") == 2
    assert table.evaluate(OBJ, ".spec.missing") is None
    assert table.evaluate(OBJ, ".spec.list[9]") is None
    assert table.evaluate(OBJ, "..weird") is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-5, "<invalid>"), (-1, "0s"), (45, "45s"), (200, "3m20s"), (600, "10m"), (5 * 3600 + 600, "5h10m"),
     (30 * 3600, "30h"), (52 * 3600, "2d4h"), (20 * 86400, "20d"), (3 * 365 * 86400, "3y")],
)  # fmt: skip
def test_human_duration_is_apimachinerys(seconds, text):
    assert table.human_duration(seconds) == text


def test_custom_resource_rows_follow_the_printer_columns():
    columns = [
        {"name": "Cluster", "type": "string", "jsonPath": ".spec.clusterName"},
        {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Until", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    result = table.to_table({"items": [OBJ], "metadata": {"resourceVersion": "9"}}, columns, custom=True, now=NOW + 90)
    assert [c["name"] for c in result["columnDefinitions"]] == ["Name", "Cluster", "Ready", "Age", "Until"]
    assert result["rows"][0]["cells"] == ["x", "c2", "True", "90s", "90s"]
    assert result["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    future = table.to_table(OBJ, columns, custom=True, now=NOW - 3600)
    assert future["rows"][0]["cells"][3] == "<invalid>"  # why date columns must never hold future times


def test_builtin_resources_get_name_and_created_at():
    result = table.to_table(OBJ, None, custom=False)
    assert [c["name"] for c in result["columnDefinitions"]] == ["Name", "Created At"]
    assert result["rows"][0]["cells"] == ["x", "2026-11-22T20:00:00Z"]


def test_crd_date_columns_hold_past_times_only():
    """A `date` column prints the time since then: the token expiry (a future time) must be a string column."""
    (version,) = crd_manifest()["spec"]["versions"]
    dates = [c["jsonPath"] for c in version["additionalPrinterColumns"] if c["type"] == "date"]
    assert dates == [".metadata.creationTimestamp"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (pip install -e '.[test]')")
def test_kubectl_get_prints_the_crd_printer_columns(cluster1, tmp_path):
    admin = cluster1.admin_client()
    kube.Resource(admin, kube.CRDS).create(crd_manifest())
    imports = kube.Resource(admin, kube.SERVICE_ACCOUNT_IMPORTS)
    body = {
        "metadata": {"name": "i", "namespace": "default"},
        "spec": {"clusterName": "c2", "namespace": "n", "name": "s"},
    }
    wait_for(lambda: _created(imports, body), "the CRD to be served")
    kubeconfig = cluster1.write_kubeconfig(tmp_path / "kubeconfig")
    out = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "sai", "-o", "wide"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    header, row = out.splitlines()
    assert header.split() == ["NAME", "CLUSTER", "REMOTE-NAMESPACE", "REMOTE-NAME", "READY", "REASON", "EXPIRES", "AGE"]
    assert row.split()[:4] == ["i", "c2", "n", "s"]


def _created(imports: kube.Resource, body: dict) -> bool:
    try:
        imports.create({"apiVersion": api.API_VERSION, "kind": api.KIND, **body})
    except Exception:
        return False
    return True
