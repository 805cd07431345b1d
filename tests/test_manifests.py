"""The installation manifests: `kubectl apply -k manifests/` renders, every object is well formed, the pods are
hardened, one image tag is used, and a real API server (the in-memory one) accepts every object.

That the RBAC is enough and no more is proven where the code runs with it: tests/test_controller_e2e.py and
tests/test_webhook_e2e.py run the controller and the webhook with service-account tokens bound to these roles.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa_testing import crd_manifest
from kubemcsa_testing.objects import create_or_get

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KUBECTL = shutil.which("kubectl")
IMAGE = "multicluster-service-account"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
}

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (pip install -e '.[test]')")


def _render(directory: Path = MANIFESTS) -> list[dict]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (pip install -e '.[test]')")
    return _render()


def test_every_yaml_file_parses():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert files
    for path in files:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        assert docs, f"{path} is empty"


def test_objects_have_what_kubernetes_requires(objects):
    kinds = {obj["kind"] for obj in objects}
    assert {"CustomResourceDefinition", "Deployment", "MutatingWebhookConfiguration", "ClusterRole"} <= kinds
    for obj in objects:
        where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
        assert obj.get("apiVersion") and obj.get("kind"), where
        assert api.is_dns_subdomain(obj["metadata"]["name"].replace(":", "-")), where
        if obj["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], where
        elif obj["kind"] in ("Role", "RoleBinding") and obj["metadata"]["name"].endswith(("-cert", "-certificates")):
            # The webhook certificate's Secret, and so the Role to write it, live in a namespace of their own.
            assert obj["metadata"].get("namespace") == api.CERT_NAMESPACE, where
        else:
            assert obj["metadata"].get("namespace") == api.SYSTEM_NAMESPACE, where


def test_crd_is_the_v1_api_of_the_original(objects):
    (crd,) = [obj for obj in objects if obj["kind"] == "CustomResourceDefinition"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == api.CRD_NAME
    assert crd["spec"]["names"]["kind"] == api.KIND
    assert api.SHORT_NAME in crd["spec"]["names"]["shortNames"]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == api.VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    # name is required unless tokenType is Federated: a CEL rule instead of `required`.
    assert set(spec["required"]) == {"clusterName", "namespace"}
    assert "has(self.name)" in spec["x-kubernetes-validations"][0]["rule"]


def test_one_image_tag_and_hardened_pods(objects):
    workloads = [obj for obj in objects if obj["kind"] in ("Deployment", "Job", "CronJob")]
    assert workloads
    for obj in workloads:
        pod = obj["spec"]["template"]["spec"]
        where = f"{obj['kind']} {obj['metadata']['name']}"
        assert pod.get("automountServiceAccountToken") is not False or obj["kind"] != "Deployment", where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for container in pod["containers"]:
            assert container["image"] == f"{IMAGE}:0.6.0", where
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert container["resources"]["requests"], where
            assert container.get("readinessProbe") and container.get("livenessProbe"), where


def test_webhook_can_never_block_its_own_recovery(objects):
    (config,) = [obj for obj in objects if obj["kind"] == "MutatingWebhookConfiguration"]
    for webhook in config["webhooks"]:
        expressions = webhook["namespaceSelector"]["matchExpressions"]
        excluded = {value for e in expressions if e["operator"] == "NotIn" for value in e["values"]}
        assert {"kube-system", api.SYSTEM_NAMESPACE} <= excluded
        assert {"key": api.NAMESPACE_LABEL, "operator": "In", "values": [api.NAMESPACE_LABEL_VALUE]} in expressions


@needs_kubectl
def test_kubectl_apply_dry_run_client_accepts_the_manifests(cluster1, tmp_path):
    kubeconfig = cluster1.write_kubeconfig(tmp_path / "kubeconfig")
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kubeconfig), "apply", "-k", str(MANIFESTS), "--dry-run=client"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "serviceaccountimports.multicluster.admiralty.io created (dry run)" in result.stdout


@needs_kubectl
@pytest.mark.real_tier
def test_kubectl_apply_dry_run_server_accepts_the_manifests(cluster1, tmp_path):
    """What `kubectl apply -k manifests/` would do, checked by the API server itself (validation, admission) without
    storing anything; the namespace first, as a server-side dry run creates none for the objects in it."""
    kubeconfig = str(cluster1.write_kubeconfig(tmp_path / "kubeconfig"))
    namespace = subprocess.run(
        [KUBECTL, "--kubeconfig", kubeconfig, "apply", "-f", str(MANIFESTS / "namespace.yaml")],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert namespace.returncode == 0, namespace.stderr
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", kubeconfig, "apply", "-k", str(MANIFESTS), "--dry-run=server"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/service-account-import-controller created (server dry run)" in result.stdout
    assert "mutatingwebhookconfiguration.admissionregistration.k8s.io/" in result.stdout
    listed = kube.Resource(cluster1.admin_client(), kube.SERVICE_ACCOUNTS).list(api.SYSTEM_NAMESPACE)["items"]
    assert [sa["metadata"]["name"] for sa in listed if sa["metadata"]["name"] != "default"] == []  # none stored


@pytest.mark.real_tier
def test_the_api_server_accepts_every_object(cluster1, objects):
    client = cluster1.admin_client()
    # Namespaces and CRDs first, as kubectl apply orders them.
    order = {"Namespace": 0, "CustomResourceDefinition": 1}
    for obj in sorted(objects, key=lambda o: order.get(o["kind"], 2)):
        try:
            kube.resource_type_of(obj)
        except ValueError:
            pytest.fail(f"{obj['kind']} is not known to kubemcsa.client.kube; add it there")
        create_or_get(client, obj)  # on a real cluster the CRD is installed already


@needs_kubectl
@pytest.mark.parametrize("directory", ["certs"])
def test_alternative_bases_render(directory):
    assert _render(MANIFESTS / directory)


def test_the_packaged_crd_is_the_installed_one():
    """The CRD is one file, manifests/'; the in-memory server's package links to it (for the demo and tests outside a
    clone), and a build copies it in."""
    link = ROOT / "kubemcsa_testing" / "crd.yaml"
    assert link.is_symlink() and link.resolve() == (MANIFESTS / "crd" / "serviceaccountimports.yaml").resolve()
    assert crd_manifest()["metadata"]["name"] == api.CRD_NAME


@pytest.mark.real_tier
def test_namespace_owners_manage_imports_with_the_roles_they_have(cluster1, objects):
    """admin and edit may write imports in their namespace (through aggregation), view may only read them."""
    admin = cluster1.admin_client()
    order = {"Namespace": 0, "CustomResourceDefinition": 1}
    for obj in sorted(objects, key=lambda o: order.get(o["kind"], 2)):
        if obj["kind"] in ("Namespace", "CustomResourceDefinition", "ClusterRole"):
            create_or_get(admin, obj)
    kube.Resource(admin, kube.NAMESPACES).create({"metadata": {"name": "team-a"}})
    clients = {}
    for role in ("admin", "edit", "view"):
        kube.Resource(admin, kube.SERVICE_ACCOUNTS).create({"metadata": {"name": role}}, "team-a")
        kube.Resource(admin, kube.ROLE_BINDINGS).create(
            {
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": role, "namespace": "team-a"}],
            },
            "team-a",
        )
        clients[role] = kube.Resource(
            cluster1.client_for_token(cluster1.issue_token("team-a", role)), kube.SERVICE_ACCOUNT_IMPORTS
        )
    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "spec": {"clusterName": "c2", "namespace": "a", "name": "b"},
    }
    for role in ("admin", "edit"):
        imports = clients[role]
        imports.create({**body, "metadata": {"name": role}}, "team-a")
        imports.patch(role, {"spec": {"name": "c"}}, "team-a")
        assert [i["metadata"]["name"] for i in imports.list("team-a")["items"]][-1] == role
        imports.delete(role, "team-a")
        with pytest.raises(ApiException) as info:
            imports.list("default")  # their namespace only
        assert info.value.status == 403
    viewer = clients["view"]
    assert viewer.list("team-a")["items"] == []
    with pytest.raises(ApiException) as info:
        viewer.create({**body, "metadata": {"name": "v"}}, "team-a")
    assert info.value.status == 403


@needs_kubectl
def test_the_alerts_component_adds_a_rule_on_the_expiry_metric(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(MANIFESTS, overlay)}]\n"
        f"components: [{os.path.relpath(MANIFESTS / 'alerts', overlay)}]\n"
    )
    rendered = _render(overlay)
    rules = [o for o in rendered if o["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    exprs = [rule["expr"] for group in rules[0]["spec"]["groups"] for rule in group["rules"]]
    assert any("kubemcsa_controller_seconds_to_next_expiry" in expr for expr in exprs)
    # Every metric an alert reads is one the controller exposes.
    from controller.metrics import Metrics

    metrics = Metrics()
    metrics.set_reachability(set(), {"cluster2"})
    exposed = metrics.exposition().decode()
    for name in {m for expr in exprs for m in re.findall(r"kubemcsa_controller_\w+", expr)}:
        assert f"\n{name}" in exposed or f"\n{name}{{" in exposed, name
    monitor = next(o for o in rendered if o["kind"] == "PodMonitor")
    deployment = next(
        o
        for o in rendered
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "service-account-import-controller"
    )
    ports = [p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
