"""Least privilege for the webhook, both ways: its manifests' RBAC is enough (every call succeeds under it, with the
in-memory server enforcing RBAC) and no more (every verb it grants is one the webhook calls)."""

from __future__ import annotations

import datetime
from pathlib import Path

import yaml

from kubemcsa.certificates import manager
from kubemcsa.client import kube
from kubemcsa.contract import api
from kubemcsa_testing import crd_manifest
from webhook.cli import CERT_SECRET_NAME, SERVICE_NAME, WEBHOOK_CONFIGURATION_NAME
from webhook.server import WebhookServer

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests" / "webhook"


def _documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def _granted() -> set[tuple[str, str, str]]:
    granted = set()
    for doc in _documents("rbac.yaml"):
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for resource in rule["resources"]:
                    name, _, sub = resource.partition("/")
                    granted |= {(verb, name, sub) for verb in rule["verbs"]}
    return granted


def test_the_webhook_is_granted_exactly_what_it_calls(cluster1, tmp_path):
    admin = cluster1.admin_client()
    kube.Resource(admin, kube.CRDS).create(crd_manifest())
    for namespace in (api.SYSTEM_NAMESPACE, api.CERT_NAMESPACE):
        kube.Resource(admin, kube.NAMESPACES).create({"metadata": {"name": namespace}})
    for name in ("serviceaccount.yaml", "rbac.yaml", "mutatingwebhookconfiguration.yaml"):
        for doc in _documents(name):
            kube.Resource(admin, kube.resource_type_of(doc)).create(doc)
    client = cluster1.client_for_token(cluster1.issue_token(api.SYSTEM_NAMESPACE, SERVICE_NAME))
    user = f"system:serviceaccount:{api.SYSTEM_NAMESPACE}:{SERVICE_NAME}"
    options = {
        "namespace": api.SYSTEM_NAMESPACE,
        "secret_name": CERT_SECRET_NAME,
        "secret_namespace": api.CERT_NAMESPACE,
        "service_name": SERVICE_NAME,
        "webhook_configuration_name": WEBHOOK_CONFIGURATION_NAME,
    }
    # Startup (create the Secret, inject caBundle), then a renewal a year later (update the Secret).
    bundle = manager.ensure_webhook_certificates(client, **options)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
    renewed = manager.ensure_webhook_certificates(client, now=later, **options)
    assert renewed.cert_pem != bundle.cert_pem

    cert_file, key_file = manager.write_files(renewed, tmp_path)
    webhook = WebhookServer(client, cert_file, key_file).start()
    try:
        assert webhook.cache.wait_for_sync(20)
        # Cache misses: the webhook asks the API once before refusing (an import or namespace made a moment ago).
        assert webhook.cache.missing_imports("default", ["made-a-moment-ago"]) == ["made-a-moment-ago"]
        assert webhook.cache.namespace_labels("made-a-moment-ago") is None
    finally:
        webhook.stop()

    calls = [r for r in cluster1.requests if r.user == user]
    assert not [(r.verb, r.path) for r in calls if r.code in (401, 403)]
    used = {(r.verb, r.resource, r.subresource) for r in calls}
    assert _granted() <= used, f"granted but never used: {sorted(_granted() - used)}"
