"""The webhook's manifests say what issue 4 asks: HA, hardened, least privilege, and a safe registration."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemcsa.contract import api
from webhook.app import MUTATE_PATH
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME, build_parser

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests" / "webhook"


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def one(kind: str) -> dict[str, Any]:
    matches = [doc for doc in documents() if doc["kind"] == kind]
    assert len(matches) == 1, kind
    return matches[0]


def test_everything_namespaced_lives_in_the_system_namespace() -> None:
    """Except the Role (and its binding) for the certificate Secret, which lives in a namespace of its own: the
    webhook may create no Secret where source credentials live."""
    for doc in documents():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            certificate = doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-cert")
            wanted = api.CERT_NAMESPACE if certificate else api.SYSTEM_NAMESPACE
            assert doc["metadata"]["namespace"] == wanted, doc["metadata"]["name"]


def test_webhook_configuration() -> None:
    configuration = one("MutatingWebhookConfiguration")
    assert configuration["metadata"]["name"] == WEBHOOK_CONFIGURATION_NAME
    (webhook,) = configuration["webhooks"]
    assert webhook["name"] == "service-account-import-admission-controller.multicluster.admiralty.io"
    assert webhook["admissionReviewVersions"] == ["v1", "v1beta1"]
    assert webhook["sideEffects"] == "None"
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["timeoutSeconds"] == 5
    assert webhook["reinvocationPolicy"] == "IfNeeded"
    assert "objectSelector" not in webhook
    assert webhook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "Namespaced",
        }
    ]
    assert webhook["clientConfig"]["service"] == {
        "name": SERVICE_NAME,
        "namespace": api.SYSTEM_NAMESPACE,
        "path": MUTATE_PATH,
        "port": 443,
    }
    expressions = webhook["namespaceSelector"]["matchExpressions"]
    assert {"key": api.NAMESPACE_LABEL, "operator": "In", "values": [api.NAMESPACE_LABEL_VALUE]} in expressions
    excluded = next(e for e in expressions if e["operator"] == "NotIn")
    assert excluded["key"] == "kubernetes.io/metadata.name"
    assert set(excluded["values"]) == {"kube-system", api.SYSTEM_NAMESPACE}
    # Only pods that carry the annotation are sent: the others never depend on the webhook being up.
    (condition,) = webhook["matchConditions"]
    assert condition["expression"] == (
        f"has(object.metadata.annotations) && '{api.IMPORT_ANNOTATION}' in object.metadata.annotations"
    )


def test_the_match_condition_selects_exactly_the_annotated_pods() -> None:
    from kubemcsa_testing.admission import MATCH_CONDITION_VARIABLES
    from kubemcsa_testing.cel import compile_expression

    (webhook,) = one("MutatingWebhookConfiguration")["webhooks"]
    program = compile_expression(webhook["matchConditions"][0]["expression"], MATCH_CONDITION_VARIABLES)
    for metadata, asks in [
        ({}, False),
        ({"annotations": None}, False),
        ({"annotations": {}}, False),
        ({"annotations": {"other": "x"}}, False),
        ({"annotations": {api.IMPORT_ANNOTATION: ""}}, True),
        ({"annotations": {api.IMPORT_ANNOTATION: "a,b"}}, True),
    ]:
        assert program.evaluate({"object": {"metadata": metadata}}) is asks, metadata


KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (pip install -e '.[test]')")


@needs_kubectl
def test_the_component_for_older_clusters_removes_only_the_match_conditions(tmp_path: Path) -> None:
    overlay = tmp_path / "older-cluster"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "manifests", overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {base}/webhook/without-match-conditions\n"
    )

    def render(directory: Path) -> list[dict[str, Any]]:
        assert KUBECTL is not None
        out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True)
        return [doc for doc in yaml.safe_load_all(out.stdout) if doc]

    current, older = render(ROOT / "manifests"), render(overlay)
    (configuration,) = [doc for doc in older if doc["kind"] == "MutatingWebhookConfiguration"]
    assert "matchConditions" not in configuration["webhooks"][0]
    for doc in current:
        if doc["kind"] == "MutatingWebhookConfiguration":
            del doc["webhooks"][0]["matchConditions"]
    assert current == older
    readme = (ROOT / "README.md").read_text()
    assert "manifests/webhook/without-match-conditions" in readme


@needs_kubectl
def test_kubectl_apply_dry_run_server_accepts_the_manifests(cluster1: Any, tmp_path: Path) -> None:
    assert KUBECTL is not None
    kubeconfig = cluster1.write_kubeconfig(tmp_path / "kubeconfig")

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [KUBECTL, "--kubeconfig", str(kubeconfig), *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)

    # As on a real cluster, a server-side dry run creates nothing, so the namespace must exist for what goes in it.
    assert kubectl("create", "namespace", api.SYSTEM_NAMESPACE).returncode == 0
    assert kubectl("create", "namespace", api.CERT_NAMESPACE).returncode == 0
    result = kubectl("apply", "-k", str(ROOT / "manifests"), "--dry-run=server")
    assert result.returncode == 0, result.stderr
    name = f"mutatingwebhookconfiguration.admissionregistration.k8s.io/{WEBHOOK_CONFIGURATION_NAME}"
    assert f"{name} created (server dry run)" in result.stdout
    assert "deployment.apps/service-account-import-admission-controller created (server dry run)" in result.stdout
    stored = kubectl("get", "mutatingwebhookconfigurations", "-o", "name")
    assert stored.returncode == 0 and stored.stdout.strip() == ""


def test_deployment_is_highly_available_and_hardened() -> None:
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "multicluster-service-account:0.6.0"
    assert container["command"][0] == "kubemcsa-webhook"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Every flag is one the CLI knows, and the certificate files land on a writable volume.
    args = build_parser().parse_args(container["command"][1:])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.cert_dir in mounts and args.port == 9443
    assert args.cert_secret == CERT_SECRET_NAME
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    service = one("Service")
    assert service["metadata"]["name"] == SERVICE_NAME
    assert service["spec"]["ports"][0]["port"] == 443
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("kind", ["ClusterRole", "Role"])
def test_rbac_is_least_privilege(kind: str) -> None:
    roles = [doc for doc in documents() if doc["kind"] == kind]
    for rule in (rule for role in roles for rule in role["rules"]):
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "configmaps" in rule["resources"]:  # the federated sources' records, in the system namespace
            assert kind == "Role" and set(rule["verbs"]) == {"list", "watch"}
        if "secrets" in rule["resources"]:
            assert kind == "Role" and not {"list", "watch", "delete"} & set(rule["verbs"])
            if set(rule["verbs"]) != {"create"}:
                assert rule["resourceNames"] == [CERT_SECRET_NAME]
        if "mutatingwebhookconfigurations" in rule["resources"]:
            assert rule["resourceNames"] == [WEBHOOK_CONFIGURATION_NAME]


def test_while_the_webhook_is_down_only_annotated_pods_wait_unless_match_conditions_are_removed() -> None:
    import copy
    import socket

    from kubemcsa_testing.admission import AdmissionAttributes, run_mutating_webhooks
    from kubemcsa_testing.errors import StatusError
    from kubemcsa_testing.rbac import UserInfo

    with socket.socket() as probe:  # a port where nothing listens: the webhook process is stopped
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    current = one("MutatingWebhookConfiguration")
    current["webhooks"][0]["clientConfig"] = {"url": f"https://127.0.0.1:{port}{MUTATE_PATH}"}
    older = copy.deepcopy(current)  # what manifests/webhook/without-match-conditions makes of it
    del older["webhooks"][0]["matchConditions"]

    def create(configuration: dict[str, Any], annotations: dict[str, str] | None) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "apps"}, "spec": {}}
        if annotations is not None:
            pod["metadata"]["annotations"] = annotations
        attributes = AdmissionAttributes(
            obj=pod,
            old_obj=None,
            operation="CREATE",
            kind={"group": "", "version": "v1", "kind": "Pod"},
            resource={"group": "", "version": "v1", "resource": "pods"},
            sub_resource="",
            namespace="apps",
            name="p",
            namespace_labels={api.NAMESPACE_LABEL: api.NAMESPACE_LABEL_VALUE, "kubernetes.io/metadata.name": "apps"},
            user=UserInfo("someone"),
            dry_run=False,
        )
        run_mutating_webhooks([configuration], attributes)

    create(current, None)
    create(current, {"other": "x"})
    for configuration, pod_annotations in ((current, {api.IMPORT_ANNOTATION: "a"}), (older, None)):
        with pytest.raises(StatusError) as refused:
            create(configuration, pod_annotations)
        assert refused.value.code == 500 and "failed calling webhook" in refused.value.message


def test_probes_and_metrics_use_the_health_port_outside_the_connection_caps() -> None:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["command"][1:])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"https": args.port, "metrics": args.health_port} and args.health_port != args.port
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] == "metrics" and get.get("scheme", "HTTP") == "HTTP", probe
    # The API server's Service exposes the webhook port only.
    assert [port["targetPort"] for port in one("Service")["spec"]["ports"]] == ["https"]


@needs_kubectl
def test_the_network_policy_component_admits_only_the_api_server_and_prometheus(tmp_path: Path) -> None:
    assert KUBECTL is not None
    overlay = tmp_path / "with-network-policy"
    overlay.mkdir()
    base = os.path.relpath(ROOT / "manifests", overlay)
    # The overlay the component's comment shows: the API server's addresses in place of the placeholder.
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {base}\ncomponents:\n  - {base}/network-policy\n"
        "patches:\n"
        "  - target: {kind: NetworkPolicy, name: service-account-import-admission-controller}\n"
        "    patch: |-\n"
        "      - op: replace\n"
        "        path: /spec/ingress/0/from\n"
        "        value: [{ipBlock: {cidr: 10.0.0.10/32}}, {ipBlock: {cidr: 10.0.0.11/32}}]\n"
    )
    out = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    rendered = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    (policy,) = [doc for doc in rendered if doc["kind"] == "NetworkPolicy"]
    (deployment,) = [doc for doc in rendered if doc["kind"] == "Deployment" and doc["metadata"]["name"] == SERVICE_NAME]
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"] == api.SYSTEM_NAMESPACE
    pod = deployment["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (container,) = pod["spec"]["containers"]
    container_ports = {port["name"] for port in container["ports"]}
    api_server, prometheus = policy["spec"]["ingress"]
    assert [p["port"] for p in api_server["ports"]] == ["https"]
    assert api_server["from"] == [{"ipBlock": {"cidr": "10.0.0.10/32"}}, {"ipBlock": {"cidr": "10.0.0.11/32"}}]
    assert [p["port"] for p in prometheus["ports"]] == ["metrics"]
    assert {"https", "metrics"} <= container_ports
    # Nothing else changes, and the README documents the component.
    base_render = subprocess.run([KUBECTL, "kustomize", str(ROOT / "manifests")], capture_output=True, text=True)
    assert [doc for doc in rendered if doc["kind"] != "NetworkPolicy"] == [
        doc for doc in yaml.safe_load_all(base_render.stdout) if doc
    ]
    assert "manifests/network-policy" in (ROOT / "README.md").read_text()
    # Without the patch the placeholder admits nobody: a documentation address (RFC 5737).
    unpatched = yaml.safe_load((ROOT / "manifests" / "network-policy" / "networkpolicy.yaml").read_text())
    assert unpatched["spec"]["ingress"][0]["from"] == [{"ipBlock": {"cidr": "192.0.2.1/32"}}]
