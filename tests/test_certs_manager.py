"""kubemcsa.certificates.manager against the in-memory API server: the Secret, the caBundle, races, renewal,
least privilege."""

import base64
import datetime
import threading
from pathlib import Path

import jsonpatch
import pytest
import yaml
from certs_tls_server import RequestLoop, TLSServer, client_context, request, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from kubemcsa.certificates import manager
from kubemcsa.certificates import plan as planning
from kubemcsa.certificates.reloader import RenewalLoop
from kubemcsa.client import kube, tls
from kubemcsa.contract import api

NAMESPACE = "multicluster-service-account"
SECRET = "service-account-import-admission-controller-cert"
SERVICE = "service-account-import-admission-controller"
CONFIGURATION = "service-account-import-admission-controller"
HOST = f"{SERVICE}.{NAMESPACE}.svc"
RBAC_YAML = Path(__file__).resolve().parent.parent / "manifests" / "certs" / "rbac.yaml"
JOB_SERVICE_ACCOUNT = "service-account-import-admission-controller-certs"
ARGS = {
    "namespace": NAMESPACE,
    "secret_name": SECRET,
    "service_name": SERVICE,
    "webhook_configuration_name": CONFIGURATION,
}
DAY = datetime.timedelta(days=1)


def _webhook(name, service_namespace=NAMESPACE, selector_namespace="enabled"):
    return {
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "timeoutSeconds": 5,
        "clientConfig": {"service": {"name": SERVICE, "namespace": service_namespace, "path": "/mutate-pods"}},
        "rules": [
            {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"], "scope": "*"}
        ],
        "namespaceSelector": {"matchLabels": {"multicluster-service-account": selector_namespace}},
    }


@pytest.fixture
def admin(cluster1):
    client = cluster1.admin_client()
    for name in (NAMESPACE, api.CERT_NAMESPACE):
        kube.Resource(client, kube.NAMESPACES).create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        )
    kube.Resource(client, kube.MUTATING_WEBHOOK_CONFIGURATIONS).create(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": CONFIGURATION},
            "webhooks": [_webhook("first.multicluster.admiralty.io"), _webhook("second.multicluster.admiralty.io")],
        }
    )
    return client


def _secret(client):
    return kube.Resource(client, kube.SECRETS).get(SECRET, NAMESPACE)


def _ca_bundles(client):
    configuration = kube.Resource(client, kube.MUTATING_WEBHOOK_CONFIGURATIONS).get(CONFIGURATION)
    return [base64.b64decode(w["clientConfig"]["caBundle"]) for w in configuration["webhooks"]]


def _writes(server):
    return [r for r in server.requests if r.verb not in ("get", "list", "watch")]


def test_from_nothing_to_a_webhook_the_api_server_trusts(cluster1, admin, tmp_path):
    bundle = manager.ensure_webhook_certificates(admin, **ARGS)
    assert bundle.actions == (
        planning.ACTION_CREATED_CA,
        planning.ACTION_ISSUED_CERT,
        f"wrote Secret {NAMESPACE}/{SECRET}",
        f"set the caBundle of 2 webhook(s) in MutatingWebhookConfiguration {CONFIGURATION}",
    )
    secret = _secret(admin)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert base64.b64decode(secret["data"]["tls.crt"]) == bundle.cert_pem
    assert _ca_bundles(admin) == [bundle.ca_pem, bundle.ca_pem]

    # A client that trusts only the caBundle and checks the Service's DNS name accepts the server.
    cert_file, key_file = manager.write_files(bundle, tmp_path)
    server = TLSServer(cert_file, key_file).start()
    try:
        assert request(client_context(_ca_bundles(admin)[0]), server.port, HOST)
        # And so does the API server itself, calling the webhook through its Service on pod creation.
        cluster1.register_service(NAMESPACE, SERVICE, 443, f"https://127.0.0.1:{server.port}")
        namespaces = kube.Resource(admin, kube.NAMESPACES)
        namespaces.create(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "apps", "labels": {"multicluster-service-account": "enabled"}},
            }
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "apps"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]},
        }
        assert kube.Resource(admin, kube.PODS).create(pod, "apps")["metadata"]["name"] == "p"
    finally:
        server.stop()


def test_a_second_run_changes_nothing(cluster1, admin):
    first = manager.ensure_webhook_certificates(admin, **ARGS)
    # The server records a request just after answering it: wait for the first run's patch to be recorded.
    wait_for(lambda: any(r.verb == "patch" for r in cluster1.requests), "the first run's requests to be recorded")
    cluster1.reset_requests()
    second = manager.ensure_webhook_certificates(admin, **ARGS)
    wait_for(lambda: len(cluster1.requests) >= 2, "the second run's reads to be recorded")
    assert second.actions == ()
    assert (second.ca_pem, second.cert_pem, second.key_pem) == (first.ca_pem, first.cert_pem, first.key_pem)
    assert _writes(cluster1) == []


def test_concurrent_replicas_converge_on_one_certificate(admin, cluster1):
    replicas = 4
    barrier = threading.Barrier(replicas)
    results: list = [None] * replicas

    def replica(index):
        client = cluster1.admin_client()
        barrier.wait()
        try:
            results[index] = manager.ensure_webhook_certificates(client, **ARGS)
        except Exception as exc:  # reported below, with the others' results
            results[index] = exc

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(r, manager.CertificateBundle) for r in results), results
    assert len({r.cert_pem for r in results}) == 1
    assert len({r.ca_pem for r in results}) == 1
    assert base64.b64decode(_secret(admin)["data"]["tls.crt"]) == results[0].cert_pem
    assert _ca_bundles(admin) == [results[0].ca_pem] * 2
    assert sum(1 for r in results if any(a.startswith("wrote") for a in r.actions)) == 1


def test_renewal_while_requests_flow_through_the_renewal_loop(admin, tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    old = manager.ensure_webhook_certificates(admin, **ARGS, now=now - 340 * DAY)
    cert_file, key_file = manager.write_files(old, tmp_path)
    server = TLSServer(cert_file, key_file).start()
    context = client_context(_ca_bundles(admin)[0])
    loop = RenewalLoop(
        admin, **ARGS, directory=tmp_path, reloader=server.reloader, interval_seconds=0.2, run_immediately=True
    )
    try:
        with RequestLoop(context, server.port, HOST) as requests:
            wait_for(lambda: len(requests.certificates) >= 20, "requests with the old certificate")
            loop.start()
            wait_for(lambda: server.reloader.reloads == 1, "the renewed certificate to be loaded")
            new_der = request(context, server.port, HOST)
            wait_for(lambda: requests.count(new_der) >= 20, "requests with the new certificate")
        assert requests.failures == []
    finally:
        loop.stop()
        server.stop()
    assert loop.last_error is None
    renewed = loop.last_bundle
    assert renewed.ca_pem == old.ca_pem  # same CA: caBundle unchanged
    assert renewed.cert_pem != old.cert_pem
    assert tls.not_after(renewed.cert_pem) > now + 300 * DAY
    assert _ca_bundles(admin)[0] == old.ca_pem


def test_a_renewed_ca_keeps_the_old_one_trusted_during_the_overlap(admin, tmp_path):
    names = tls.service_dns_names(SERVICE, NAMESPACE)
    now = datetime.datetime.now(datetime.UTC)
    # A Secret written 9.3 years ago: its CA has under a year left, so it is due for renewal.
    old = planning.plan(None, names, now - 3400 * DAY).material
    kube.Resource(admin, kube.SECRETS).create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "type": "kubernetes.io/tls",
            "data": planning.material_to_secret_data(old),
        }
    )
    renewed = manager.ensure_webhook_certificates(admin, **ARGS)
    assert planning.ACTION_RENEWED_CA in renewed.actions
    bundle = _ca_bundles(admin)[0]
    assert bundle == renewed.ca_pem
    assert len(tls.load_certificates(bundle)) == 2
    assert bundle.endswith(old.ca_bundle_pem)
    # A replica still presenting a certificate of the old CA stays trusted, as does one with the new certificate.
    still_old = tls.make_serving_cert(old.ca_bundle_pem, old.ca_key_pem, names, now=now)
    for index, (cert_pem, key_pem) in enumerate([(renewed.cert_pem, renewed.key_pem), still_old]):
        pair = manager.CertificateBundle(bundle, cert_pem, key_pem, tls.not_after(cert_pem))
        cert_file, key_file = manager.write_files(pair, tmp_path / str(index))
        server = TLSServer(cert_file, key_file).start()
        try:
            assert request(client_context(bundle), server.port, HOST)
        finally:
            server.stop()


def test_a_deleted_secret_does_not_cut_off_replicas_still_serving_the_old_certificate(admin, tmp_path):
    old = manager.ensure_webhook_certificates(admin, **ARGS)
    kube.Resource(admin, kube.SECRETS).delete(SECRET, NAMESPACE)
    new = manager.ensure_webhook_certificates(admin, **ARGS)
    assert planning.ACTION_CREATED_CA in new.actions
    bundle = _ca_bundles(admin)[0]
    assert bundle == new.ca_pem
    assert len(tls.load_certificates(bundle)) == 2 and bundle.endswith(old.ca_pem)
    for index, pair in enumerate((old, new)):
        cert_file, key_file = manager.write_files(pair, tmp_path / str(index))
        server = TLSServer(cert_file, key_file).start()
        try:
            assert request(client_context(bundle), server.port, HOST)
        finally:
            server.stop()


def test_an_existing_secret_keeps_its_type_and_other_keys(admin):
    kube.Resource(admin, kube.SECRETS).create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "type": "Opaque",
            "data": {"note": base64.b64encode(b"keep me").decode(), "tls.crt": base64.b64encode(b"junk").decode()},
        }
    )
    bundle = manager.ensure_webhook_certificates(admin, **ARGS)
    secret = _secret(admin)
    assert secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["note"]) == b"keep me"
    assert base64.b64decode(secret["data"]["tls.crt"]) == bundle.cert_pem


def test_a_missing_webhook_configuration_is_reported_after_the_secret_is_written(admin):
    kube.Resource(admin, kube.MUTATING_WEBHOOK_CONFIGURATIONS).delete(CONFIGURATION)
    with pytest.raises(manager.WebhookConfigurationNotFound, match="apply manifests/"):
        manager.ensure_webhook_certificates(admin, **ARGS)
    assert _secret(admin)["type"] == "kubernetes.io/tls"


def _apply_rbac(admin):
    for doc in yaml.safe_load_all(RBAC_YAML.read_text()):
        kube.Resource(admin, kube.resource_type_of(doc)).create(doc)
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": JOB_SERVICE_ACCOUNT, "namespace": NAMESPACE},
        }
    )


def test_the_manifests_rbac_is_enough_and_no_more(cluster1, admin):
    _apply_rbac(admin)
    job = cluster1.client_for_token(cluster1.issue_token(NAMESPACE, JOB_SERVICE_ACCOUNT))
    # The Secret lives in a namespace of its own (as the Job's --secret-namespace says), not the system namespace.
    args = {**ARGS, "secret_namespace": api.CERT_NAMESPACE}
    bundle = manager.ensure_webhook_certificates(job, **args)
    assert f"wrote Secret {api.CERT_NAMESPACE}/{SECRET}" in bundle.actions
    # Renewal (update) works too.
    renewed = manager.ensure_webhook_certificates(job, **args, renew_before=400 * DAY, cert_days=401)
    assert renewed.cert_pem != bundle.cert_pem
    # Other Secrets and other configurations are out of reach.
    secrets = kube.Resource(job, kube.SECRETS)
    kube.Resource(admin, kube.SECRETS).create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other", "namespace": NAMESPACE}}
    )
    with pytest.raises(ApiException) as denied:
        secrets.get("other", NAMESPACE)
    assert denied.value.status == 403
    with pytest.raises(ApiException) as denied:
        kube.Resource(job, kube.MUTATING_WEBHOOK_CONFIGURATIONS).list()
    assert denied.value.status == 403


def test_missing_permissions_are_explained_without_key_material(cluster1, admin):
    kube.Resource(admin, kube.SERVICE_ACCOUNTS).create(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody", "namespace": NAMESPACE}}
    )
    nobody = cluster1.client_for_token(cluster1.issue_token(NAMESPACE, "nobody"))
    with pytest.raises(manager.CertificateError) as info:
        manager.ensure_webhook_certificates(nobody, **ARGS)
    message = str(info.value)
    assert f"Secret {NAMESPACE}/{SECRET}" in message and "manifests/certs/rbac.yaml" in message
    assert "PRIVATE" not in message and "\n" not in message


def test_an_unreachable_api_server_is_one_sentence(api_server_factory):
    server = api_server_factory(name="gone")
    client = server.admin_client()
    server.stop()
    with pytest.raises(manager.CertificateError, match="unreachable"):
        manager.ensure_webhook_certificates(client, **ARGS)


def test_ca_bundle_patch_only_touches_webhooks_that_differ():
    configuration = {
        "webhooks": [
            {"name": "a", "clientConfig": {"caBundle": "X"}},
            {"name": "b", "clientConfig": {}},
            {"name": "c"},
            {"clientConfig": {}},
            "junk",
        ]
    }
    assert manager.ca_bundle_patch(configuration, "X") == [
        {"op": "test", "path": "/webhooks/1/name", "value": "b"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": "X"},
    ]
    assert manager.ca_bundle_patch({"webhooks": None}, "X") == []
    assert manager.ca_bundle_patch({}, "X") == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)
_webhooks = st.lists(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {},
            optional={
                "name": st.one_of(st.text(max_size=5), _json),
                "clientConfig": st.one_of(_json, st.fixed_dictionaries({}, optional={"caBundle": _json})),
            },
        ),
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None)
@given(webhooks=_webhooks)
def test_ca_bundle_patch_applies_to_any_configuration_and_sets_every_bundle(webhooks):
    configuration = {"webhooks": webhooks}
    patched = jsonpatch.apply_patch(configuration, manager.ca_bundle_patch(configuration, "CA"))
    for webhook in patched["webhooks"]:
        if (
            isinstance(webhook, dict)
            and isinstance(webhook.get("clientConfig"), dict)
            and isinstance(webhook.get("name"), str)
        ):
            assert webhook["clientConfig"]["caBundle"] == "CA"
    assert manager.ca_bundle_patch(patched, "CA") == []


def test_the_renewal_loop_survives_errors_and_stops_promptly(api_server_factory, tmp_path):
    server = api_server_factory(name="flaky")
    client = server.admin_client()
    server.stop()
    loop = RenewalLoop(
        client, **ARGS, directory=tmp_path, interval_seconds=60, retry_seconds=0.05, run_immediately=True
    ).start()
    try:
        wait_for(lambda: loop.last_error is not None, "the first failure to be recorded")
        assert "unreachable" in loop.last_error and loop.last_bundle is None
    finally:
        loop.stop(timeout=10)
    assert not loop._thread.is_alive()
