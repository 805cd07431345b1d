"""tokenType Federated in the API: the spec's parsing and defaults, the CRD's validation rule, `kubectl explain`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa.contract.spec import DEFAULT_FEDERATED_EXPIRATION_SECONDS, SpecError, parse_spec
from kubemcsa_testing import crd_manifest

KUBECTL = shutil.which("kubectl")


def imp(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "fed", "namespace": "default"},
        "spec": {"clusterName": "cluster2", "namespace": "default", **spec},
    }


def test_a_federated_spec_needs_no_name_and_lives_an_hour_by_default() -> None:
    spec = parse_spec(imp(tokenType="Federated"))
    assert spec.federated and not spec.legacy and spec.name == ""
    assert spec.expiration_seconds == DEFAULT_FEDERATED_EXPIRATION_SECONDS == 3600
    assert spec.audiences == ()
    assert parse_spec(imp(tokenType="Federated", name="ignored")).name == ""
    assert parse_spec(imp(tokenType="Federated", expirationSeconds=7200, audiences=["c2"])).audiences == ("c2",)


def test_other_modes_keep_their_defaults_and_still_need_a_name() -> None:
    assert parse_spec(imp(name="sa")).expiration_seconds == api.DEFAULT_EXPIRATION_SECONDS
    with pytest.raises(SpecError, match=r"spec\.name is required"):
        parse_spec(imp())
    with pytest.raises(SpecError, match="TokenRequest, Legacy, Federated"):
        parse_spec(imp(name="sa", tokenType="Other"))
    # A federated import feeds Argo CD too (its Argo CD Secret reads the projected token file).
    assert parse_spec(imp(tokenType="Federated", argoCD={})).argocd is not None


@pytest.fixture
def with_crd(cluster1) -> Any:
    kube.Resource(cluster1.admin_client(), kube.CRDS).create(crd_manifest())
    return cluster1


def test_the_crd_requires_name_unless_federated(with_crd) -> None:
    imports = kube.Resource(with_crd.admin_client(), kube.SERVICE_ACCOUNT_IMPORTS)
    imports.create(imp(tokenType="Federated"), "default")
    with pytest.raises(ApiException) as info:
        imports.create({**imp(), "metadata": {"name": "plain", "namespace": "default"}}, "default")
    status = json.loads(info.value.body)
    assert info.value.status == 422
    assert status["details"]["causes"][0] == {
        "reason": "FieldValueInvalid",
        "message": 'Invalid value: "object": spec.name is required unless spec.tokenType is Federated',
        "field": "spec",
    }
    imports.create({**imp(name="sa"), "metadata": {"name": "named", "namespace": "default"}}, "default")


def test_a_crd_rule_outside_the_evaluators_subset_is_refused_when_the_crd_is_written(cluster1) -> None:
    crd = crd_manifest()
    spec_schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [{"rule": "self.name.lowerAscii() == self.name"}]
    with pytest.raises(ApiException) as info:
        kube.Resource(cluster1.admin_client(), kube.CRDS).create(crd)
    assert info.value.status == 422 and "compilation failed" in info.value.body


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (pip install -e '.[test]')")
def test_kubectl_explain_says_name_is_optional_for_federated_imports(with_crd, tmp_path: Path) -> None:
    config = with_crd.write_kubeconfig(tmp_path / "kubeconfig")
    out = subprocess.run(
        [str(KUBECTL), "--kubeconfig", config, "explain", "serviceaccountimports.spec.name"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Required unless tokenType is Federated" in " ".join(out.split())
    out = subprocess.run(
        [str(KUBECTL), "--kubeconfig", config, "explain", "serviceaccountimports.spec.tokenType"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Federated: no token is copied" in " ".join(out.split())
