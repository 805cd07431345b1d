"""Keep the webhook's certificate Secret and the MutatingWebhookConfiguration's caBundle right (the API edge).

`ensure_webhook_certificates` is safe to run from every webhook replica at once and from a one-shot Job: the
Secret is written with optimistic concurrency (create races end in 409 AlreadyExists, updates in 409 Conflict),
the loser re-reads and adopts the winner's certificate, and it returns only once the caBundle trusts the CA of
the certificate it returns, so a server never presents a certificate the API server does not trust yet.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from kubemcsa.certificates import plan as planning
from kubemcsa.client import kube, tls

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
# Optimistic-concurrency retries; each one means another writer changed the object in between.
MAX_ATTEMPTS = 5
SECRET_LABELS = {
    "app.kubernetes.io/part-of": "multicluster-service-account",
    "app.kubernetes.io/component": "webhook-certificates",
}


class CertificateError(RuntimeError):
    """The certificates could not be ensured; the message says what failed and what to do (never key material)."""


class WebhookConfigurationNotFound(CertificateError):
    """The MutatingWebhookConfiguration to inject the CA into does not exist (yet)."""


@dataclass(frozen=True)
class CertificateBundle:
    """What a webhook server needs: the CA bundle (for caBundle and clients), its certificate and key.

    `actions` says what this call changed (empty when everything was already right). The repr hides the key.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    not_after: datetime.datetime
    actions: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"CertificateBundle(not_after={self.not_after.isoformat()}, ca_pem=<{len(self.ca_pem)} bytes>, "
            f"cert_pem=<{len(self.cert_pem)} bytes>, key_pem=<hidden>, actions={self.actions!r})"
        )


def _describe(exc: BaseException, what: str, fix: str) -> CertificateError:
    if isinstance(exc, ApiException):
        reason = kube.error_reason(exc) or f"HTTP {exc.status}"
        return CertificateError(f"cannot {what}: {reason}: {kube.error_message(exc)}; {fix}")
    return CertificateError(
        f"cannot {what}: the API server is unreachable ({type(exc).__name__}); check the kubeconfig and the network"
    )


def _rbac_fix(exc: BaseException, default: str) -> str:
    if isinstance(exc, ApiException) and exc.status in (401, 403):
        return (
            "grant the ServiceAccount get, create and update on this Secret and get and patch on the webhook "
            "configuration (see manifests/certs/rbac.yaml)"
        )
    return default


def _get_or_none(resource: kube.Resource, name: str, namespace: str | None) -> dict[str, Any] | None:
    try:
        return resource.get(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _secret_body(existing: dict[str, Any] | None, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    if existing is None:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(SECRET_LABELS)},
            "type": planning.SECRET_TYPE_TLS,
            "data": data,
        }
    # Keep everything else (type, labels, keys we do not own): the type is immutable and no data is lost.
    body = dict(existing)
    body["data"] = {**(existing.get("data") or {}), **data}
    body.pop("stringData", None)
    return body


def _ensure_secret(
    api_client: ApiClient,
    namespace: str,
    secret_name: str,
    webhook_configuration_name: str,
    dns_names: Sequence[str],
    now: datetime.datetime | None,
    plan_options: dict[str, Any],
) -> tuple[planning.Material, list[str]]:
    secrets = kube.Resource(api_client, kube.SECRETS)
    where = f"Secret {namespace}/{secret_name}"
    for _ in range(MAX_ATTEMPTS):
        try:
            secret = _get_or_none(secrets, secret_name, namespace)
        except (ApiException, *kube.CONNECTION_ERRORS) as exc:
            raise _describe(exc, f"read {where}", _rbac_fix(exc, "retry later")) from None
        current = planning.material_from_secret_data(secret.get("data") if secret else None)
        decided = planning.plan(current, dns_names, now, **plan_options)
        if planning.ACTION_CREATED_CA in decided.actions:
            # The Secret lost its CA: keep trusting what the API server trusts now for a while, so replicas still
            # serving the lost certificate are not cut off before they pick up the new one.
            previous = trusted_ca_bundles(api_client, webhook_configuration_name)
            if previous:
                options = {**plan_options, "previous_ca_bundle_pem": previous}
                decided = planning.plan(current, dns_names, now, **options)
        if not decided.changed:
            return decided.material, []
        body = _secret_body(secret, namespace, secret_name, planning.material_to_secret_data(decided.material))
        try:
            if secret is None:
                secrets.create(body, namespace)
            else:
                secrets.replace(body, namespace)
        except ApiException as exc:
            if exc.status == 409:
                # Another replica wrote first (AlreadyExists or Conflict): re-read and adopt its certificate.
                log.info("%s changed while we wrote it (%s); re-reading", where, kube.error_reason(exc))
                continue
            raise _describe(exc, f"write {where}", _rbac_fix(exc, "check the Secret")) from None
        except kube.CONNECTION_ERRORS as exc:
            raise _describe(exc, f"write {where}", "retry later") from None
        return decided.material, [*decided.actions, f"wrote {where}"]
    raise CertificateError(f"cannot write {where}: it kept changing under us {MAX_ATTEMPTS} times; retry later")


def trusted_ca_bundles(api_client: ApiClient, webhook_configuration_name: str) -> bytes:
    """The PEM CAs the webhook configuration's webhooks trust now (b"" if it cannot be read: best effort)."""
    try:
        configuration = kube.Resource(api_client, kube.MUTATING_WEBHOOK_CONFIGURATIONS).get(webhook_configuration_name)
    except (ApiException, *kube.CONNECTION_ERRORS):
        return b""
    bundles: list[bytes] = []
    for webhook in configuration.get("webhooks") or []:
        client_config = webhook.get("clientConfig") if isinstance(webhook, dict) else None
        value = client_config.get("caBundle") if isinstance(client_config, dict) else None
        if isinstance(value, str):
            try:
                bundles.append(base64.b64decode(value, validate=True))
            except ValueError:
                continue
    return b"\n".join(bundles)


def ca_bundle_patch(configuration: dict[str, Any], ca_bundle_b64: str) -> list[dict[str, Any]]:
    """JSON Patch operations that set caBundle on every webhook whose caBundle differs (empty: nothing to do).

    Each change is guarded by a `test` of the webhook's name at that index, so a concurrent edit of the list
    makes the patch fail instead of writing a caBundle into the wrong webhook.
    """
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(configuration.get("webhooks") or []):
        # A webhook without a name is invalid (the API server refuses it); without one we cannot guard the index.
        if not isinstance(webhook, dict) or not isinstance(webhook.get("clientConfig"), dict):
            continue
        if not isinstance(webhook.get("name"), str):
            continue
        if webhook["clientConfig"].get("caBundle") == ca_bundle_b64:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook.get("name")})
        ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": ca_bundle_b64})
    return ops


def inject_ca_bundle(api_client: ApiClient, webhook_configuration_name: str, ca_bundle_pem: bytes) -> list[str]:
    """Set caBundle on every webhook of the MutatingWebhookConfiguration (only where it differs); what it did."""
    configurations = kube.Resource(api_client, kube.MUTATING_WEBHOOK_CONFIGURATIONS)
    where = f"MutatingWebhookConfiguration {webhook_configuration_name}"
    ca_bundle_b64 = base64.b64encode(ca_bundle_pem).decode()
    last_error: ApiException | None = None
    for _ in range(MAX_ATTEMPTS):
        try:
            configuration = _get_or_none(configurations, webhook_configuration_name, None)
        except (ApiException, *kube.CONNECTION_ERRORS) as exc:
            raise _describe(exc, f"read {where}", _rbac_fix(exc, "retry later")) from None
        if configuration is None:
            raise WebhookConfigurationNotFound(
                f"{where} not found; apply manifests/ (the certificate Secret is ready and will be injected then)"
            )
        ops = ca_bundle_patch(configuration, ca_bundle_b64)
        if not ops:
            return []
        try:
            configurations.patch(webhook_configuration_name, ops, patch_type="json")
        except ApiException as exc:
            if exc.status in (409, 422):
                # Most likely the list changed between our read and our patch (a `test` failed): read it again.
                last_error = exc
                continue
            raise _describe(exc, f"patch the caBundle of {where}", _rbac_fix(exc, "check the object")) from None
        except kube.CONNECTION_ERRORS as exc:
            raise _describe(exc, f"patch {where}", "retry later") from None
        return [f"set the caBundle of {len(ops) // 2} webhook(s) in {where}"]
    if last_error is None:  # only if MAX_ATTEMPTS < 1
        raise CertificateError(f"cannot patch the caBundle of {where}: no attempt was made")
    raise _describe(last_error, f"patch the caBundle of {where} after {MAX_ATTEMPTS} attempts", "check the object")


def ensure_webhook_certificates(
    api_client: ApiClient,
    *,
    namespace: str,
    secret_name: str,
    service_name: str,
    webhook_configuration_name: str,
    now: datetime.datetime | None = None,
    dns_names: Sequence[str] | None = None,
    secret_namespace: str | None = None,
    **plan_options: Any,
) -> CertificateBundle:
    """Make the Secret hold a valid CA and serving certificate for the Service, and the caBundle trust that CA.

    The Secret lives in `secret_namespace` (default: the Service's `namespace`); the shipped manifests keep it in a
    namespace of its own (kubemcsa.contract.api.CERT_NAMESPACE), away from the source credentials of the system
    namespace.
    Creates what is missing, renews what expires soon (see kubemcsa.certificates.plan.plan for the rules and
    `plan_options`:
    ca_days, cert_days, renew_before, ca_renew_before), and adopts another replica's certificate if it wrote first.
    Raises CertificateError (WebhookConfigurationNotFound if the configuration does not exist; the Secret is then
    already written, so a retry only injects the CA).
    """
    names = list(dns_names) if dns_names else tls.service_dns_names(service_name, namespace)
    material, actions = _ensure_secret(
        api_client, secret_namespace or namespace, secret_name, webhook_configuration_name, names, now, plan_options
    )
    actions += inject_ca_bundle(api_client, webhook_configuration_name, material.ca_bundle_pem)
    return CertificateBundle(
        ca_pem=material.ca_bundle_pem,
        cert_pem=material.cert_pem,
        key_pem=material.key_pem,
        not_after=tls.not_after(material.cert_pem),
        actions=tuple(actions),
    )


def _write_atomically(path: Path, content: bytes, mode: int) -> bool:
    """Replace `path` with `content` in one rename (readers see the old or the new file, never a mix)."""
    try:
        if path.read_bytes() == content:
            return False
    except OSError:
        pass
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return True


def write_files(bundle: CertificateBundle, directory: str | os.PathLike[str]) -> tuple[str, str]:
    """Write tls.crt, tls.key (mode 0600) and ca.crt into `directory`, each atomically and only if it changed.

    The key is written first, then the certificate: a reader may see a mismatched pair for a moment, which
    kubemcsa.certificates.reloader.CertificateReloader detects and retries.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = root / CERT_FILE, root / KEY_FILE
    _write_atomically(key_file, bundle.key_pem, 0o600)
    _write_atomically(cert_file, bundle.cert_pem, 0o644)
    _write_atomically(root / CA_FILE, bundle.ca_pem, 0o644)
    return str(cert_file), str(key_file)
