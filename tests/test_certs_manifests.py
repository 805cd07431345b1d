"""manifests/certs and manifests/cert-manager: consistent names, least privilege, restricted pods, a valid overlay."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from certs.__main__ import _parser
from kubemcsa.client import tls
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
NAMESPACE = "multicluster-service-account"


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _pod_specs() -> list[dict]:
    job = _docs(MANIFESTS / "certs" / "job.yaml")[0]
    cron = _docs(MANIFESTS / "certs" / "cronjob.yaml")[0]
    return [job["spec"]["template"]["spec"], cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]]


@pytest.mark.parametrize("index", [0, 1], ids=["job", "cronjob"])
def test_the_job_command_is_valid_and_names_the_webhooks_objects(index):
    spec = _pod_specs()[index]
    command = spec["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "certs"]
    args = _parser().parse_args(command[3:])
    assert (args.namespace, args.secret, args.service, args.webhook_configuration) == (
        NAMESPACE,
        CERT_SECRET_NAME,
        SERVICE_NAME,
        WEBHOOK_CONFIGURATION_NAME,
    )
    assert spec["serviceAccountName"] == _docs(MANIFESTS / "certs" / "serviceaccount.yaml")[0]["metadata"]["name"]


@pytest.mark.parametrize("index", [0, 1], ids=["job", "cronjob"])
def test_the_job_runs_restricted(index):
    spec = _pod_specs()[index]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    container = spec["containers"][0]["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["readOnlyRootFilesystem"] is True
    assert container["capabilities"]["drop"] == ["ALL"]


def test_rbac_grants_one_secret_and_one_configuration_by_name():
    docs = _docs(MANIFESTS / "certs" / "rbac.yaml")
    role = next(d for d in docs if d["kind"] == "Role")
    cluster_role = next(d for d in docs if d["kind"] == "ClusterRole")
    by_name = [r for r in role["rules"] if r.get("resourceNames")]
    unnamed = [r for r in role["rules"] if not r.get("resourceNames")]
    assert by_name == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CERT_SECRET_NAME], "verbs": ["get", "update"]}
    ]
    # create is the one verb RBAC cannot restrict by name; nothing else is granted namespace-wide.
    assert unnamed == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": [WEBHOOK_CONFIGURATION_NAME],
            "verbs": ["get", "patch"],
        }
    ]
    service_account = _docs(MANIFESTS / "certs" / "serviceaccount.yaml")[0]["metadata"]["name"]
    for binding in (d for d in docs if d["kind"].endswith("Binding")):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}]


@pytest.fixture(scope="module")
def cert_manager_overlay(tmp_path_factory):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; install the test extras: pip install -e '.[test]'")
    overlay = tmp_path_factory.mktemp("overlay")
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS, overlay)],
                "components": [os.path.relpath(MANIFESTS / "cert-manager", overlay)],
            }
        )
    )
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def _one(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_cert_manager_injects_the_ca_of_the_serving_certificate(cert_manager_overlay):
    configuration = _one(cert_manager_overlay, "MutatingWebhookConfiguration", WEBHOOK_CONFIGURATION_NAME)
    reference = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    namespace, name = reference.split("/")
    certificate = _one(cert_manager_overlay, "Certificate", name)
    assert certificate["metadata"]["namespace"] == namespace == NAMESPACE
    assert certificate["spec"]["secretName"] == CERT_SECRET_NAME
    assert certificate["spec"]["dnsNames"] == tls.service_dns_names(SERVICE_NAME, NAMESPACE)[:2]
    # Signed by a CA issuer (not self-signed), so caBundle does not change when the serving certificate renews.
    issuer = _one(cert_manager_overlay, "Issuer", certificate["spec"]["issuerRef"]["name"])
    ca_certificate = next(
        d
        for d in cert_manager_overlay
        if d["kind"] == "Certificate" and d["spec"]["secretName"] == issuer["spec"]["ca"]["secretName"]
    )
    assert ca_certificate["spec"]["isCA"] is True
    assert "selfSigned" in _one(cert_manager_overlay, "Issuer", ca_certificate["spec"]["issuerRef"]["name"])["spec"]


def test_cert_manager_overlay_makes_the_webhook_serve_the_mounted_secret(cert_manager_overlay):
    deployment = _one(cert_manager_overlay, "Deployment", SERVICE_NAME)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "--manage-certificates" not in container["command"]
    assert "--tls-cert-file=/run/webhook-tls/tls.crt" in container["command"]
    assert "--tls-key-file=/run/webhook-tls/tls.key" in container["command"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/run/webhook-tls")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == CERT_SECRET_NAME
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_cert_manager_overlay_takes_away_the_webhooks_secret_permissions(cert_manager_overlay):
    webhook_roles = [
        doc
        for doc in cert_manager_overlay
        if doc["kind"] in ("Role", "ClusterRole") and "admission-controller" in doc["metadata"]["name"]
    ]
    assert webhook_roles
    for doc in webhook_roles:
        for rule in doc["rules"]:
            assert "secrets" not in rule["resources"], doc["metadata"]["name"]
