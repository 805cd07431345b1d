"""The webhook's manifests say what issue 4 asks: HA, hardened, least privilege, and a safe registration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemcsa import api
from webhook.__main__ import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME, _parser
from webhook.app import MUTATE_PATH

MANIFESTS = Path(__file__).parent.parent / "manifests" / "webhook"


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
    for doc in documents():
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"):
            assert doc["metadata"]["namespace"] == api.SYSTEM_NAMESPACE, doc["metadata"]["name"]


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
    args = _parser().parse_args(container["command"][1:])
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
    for rule in one(kind)["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        if "secrets" in rule["resources"]:
            assert kind == "Role" and not {"list", "watch", "delete"} & set(rule["verbs"])
            if set(rule["verbs"]) != {"create"}:
                assert rule["resourceNames"] == [CERT_SECRET_NAME]
        if "mutatingwebhookconfigurations" in rule["resources"]:
            assert rule["resourceNames"] == [WEBHOOK_CONFIGURATION_NAME]
