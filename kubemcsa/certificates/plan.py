"""Decide what the webhook's certificate Secret should hold (pure: stored material and a clock in, new material out).

The Secret is a `kubernetes.io/tls` Secret with `tls.crt`, `tls.key`, `ca.crt` and, when we made the CA, `ca.key`
(so any replica can renew the serving certificate without changing the CA, which keeps `caBundle` stable).
`ca.crt` is a bundle: the signing CA first, then older CAs that are still valid, so that while a new CA rolls
out, servers still presenting a certificate from the old CA stay trusted.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kubemcsa.client import tls

KEY_CA_CRT = "ca.crt"
KEY_CA_KEY = "ca.key"
KEY_TLS_CRT = "tls.crt"
KEY_TLS_KEY = "tls.key"
SECRET_TYPE_TLS = "kubernetes.io/tls"

# Renew the CA when less than this is left; must exceed the serving certificate's renew_before (see plan()).
DEFAULT_CA_RENEW_BEFORE = datetime.timedelta(days=365)
# How long CAs replaced by a new one stay trusted in the bundle: every replica picks up the new certificate well
# within this (at its next renewal round), and a retired CA is not trusted for years after.
DEFAULT_CA_OVERLAP = datetime.timedelta(days=7)

ACTION_CREATED_CA = "created a new CA"
ACTION_RENEWED_CA = "renewed the CA (the old one stays trusted in the CA bundle for a week)"
ACTION_ISSUED_CERT = "issued a new serving certificate"
ACTION_PRUNED_CAS = "removed retired CAs from the CA bundle"


@dataclass(frozen=True)
class Material:
    """What the Secret holds, as PEM bytes. The repr never shows the private keys."""

    ca_bundle_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_key_pem: bytes = field(default=b"", repr=False)

    def __repr__(self) -> str:
        return (
            f"Material(ca_bundle_pem=<{len(self.ca_bundle_pem)} bytes>, cert_pem=<{len(self.cert_pem)} bytes>, "
            f"key_pem=<hidden>, ca_key_pem=<{'hidden' if self.ca_key_pem else 'absent'}>)"
        )


@dataclass(frozen=True)
class Plan:
    material: Material
    actions: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.actions)


def material_from_secret_data(data: Mapping[str, str] | None) -> Material | None:
    """The Material of a Secret's base64 `data`, or None if it has no certificate at all. Never raises."""
    if not isinstance(data, Mapping):
        return None
    decoded: dict[str, bytes] = {}
    for key in (KEY_CA_CRT, KEY_CA_KEY, KEY_TLS_CRT, KEY_TLS_KEY):
        value = data.get(key)
        if not isinstance(value, str):
            decoded[key] = b""
            continue
        try:
            decoded[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            decoded[key] = b""
    if not decoded[KEY_CA_CRT] and not decoded[KEY_TLS_CRT]:
        return None
    return Material(
        ca_bundle_pem=decoded[KEY_CA_CRT],
        cert_pem=decoded[KEY_TLS_CRT],
        key_pem=decoded[KEY_TLS_KEY],
        ca_key_pem=decoded[KEY_CA_KEY],
    )


def material_to_secret_data(material: Material) -> dict[str, str]:
    """The Secret's base64 `data` for `material` (ca.key only when we hold the CA's key)."""
    data = {
        KEY_CA_CRT: material.ca_bundle_pem,
        KEY_TLS_CRT: material.cert_pem,
        KEY_TLS_KEY: material.key_pem,
    }
    if material.ca_key_pem:
        data[KEY_CA_KEY] = material.ca_key_pem
    return {key: base64.b64encode(value).decode() for key, value in data.items()}


def _split_bundle(bundle_pem: bytes) -> list[bytes]:
    """The PEM certificates of a bundle that parse, each as its own PEM; bad ones are dropped."""
    out = []
    for chunk in bundle_pem.split(b"-----END CERTIFICATE-----"):
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            continue
        pem = chunk[start:] + b"-----END CERTIFICATE-----\n"
        try:
            tls.load_certificate(pem)
        except tls.CertificateFormatError:
            continue
        out.append(pem)
    return out


def _usable_ca(ca_pem: bytes, ca_key_pem: bytes, now: datetime.datetime, renew_before: datetime.timedelta) -> bool:
    """True if this CA can keep signing: a CA, its key at hand, and not expiring within renew_before."""
    try:
        ca = tls.load_certificate(ca_pem)
    except tls.CertificateFormatError:
        return False
    if not tls.is_ca(ca) or not tls.key_matches(ca_pem, ca_key_pem):
        return False
    return ca.not_valid_after_utc - now >= renew_before and ca.not_valid_before_utc - now <= tls.CLOCK_SKEW


def _still_valid(pem: bytes, now: datetime.datetime) -> bool:
    return tls.load_certificate(pem).not_valid_after_utc > now


def plan(
    current: Material | None,
    dns_names: Sequence[str],
    now: datetime.datetime | None = None,
    *,
    ca_common_name: str = "multicluster-service-account-webhook-ca",
    ca_days: int = tls.DEFAULT_CA_DAYS,
    cert_days: int = tls.DEFAULT_CERT_DAYS,
    renew_before: datetime.timedelta = tls.DEFAULT_RENEW_BEFORE,
    ca_renew_before: datetime.timedelta = DEFAULT_CA_RENEW_BEFORE,
    ca_overlap: datetime.timedelta = DEFAULT_CA_OVERLAP,
    previous_ca_bundle_pem: bytes = b"",
) -> Plan:
    """What the Secret should hold at `now`: `current` untouched when it is fine, else what to change and why.

    - A serving certificate that is valid for `dns_names`, signed by the first CA of the bundle, not expiring
      within `renew_before`, with its key, is kept, even without `ca.key` (certificates brought by the user).
    - The CA is kept while it has at least `ca_renew_before` left. A replaced CA stays in the bundle after the new
      one for `ca_overlap` (or until it expires), so servers still presenting its certificates remain trusted.
    - When the Secret had no CA at all (deleted, emptied), the CAs of `previous_ca_bundle_pem` (what the
      webhook configuration trusts now) are kept the same way, so replicas still serving the lost certificate
      are not cut off while they catch up.
    - The serving certificate is reissued whenever the CA changes, or it needs renewal (tls.needs_renewal).
    """
    now = tls.as_utc(now)
    # The CA must be renewed before any serving certificate it signs needs renewal because of it (serving
    # certificates never outlive their CA), or every run would reissue a certificate capped at the CA's expiry.
    ca_renew_before = max(ca_renew_before, renew_before + datetime.timedelta(days=1))
    if datetime.timedelta(days=ca_days) <= ca_renew_before:
        raise ValueError(
            f"ca_days ({ca_days}) must be longer than the CA's renewal window ({ca_renew_before.days} days)"
        )
    if datetime.timedelta(days=cert_days) <= renew_before:
        raise ValueError(f"cert_days ({cert_days}) must be longer than renew_before ({renew_before.days} days)")
    bundle = _split_bundle(current.ca_bundle_pem) if current else []
    signer = bundle[0] if bundle else b""
    signer_key = current.ca_key_pem if current else b""
    actions: list[str] = []

    serving_ok = (
        current is not None
        and not tls.needs_renewal(current.cert_pem, signer, dns_names, now, renew_before)
        and tls.key_matches(current.cert_pem, current.key_pem)
    )
    ca_ok = _usable_ca(signer, signer_key, now, ca_renew_before)
    # Without ca.key (a pair brought by the user) a fine serving certificate is kept until it needs renewal.
    if not ca_ok and (not serving_ok or signer_key):
        signer, signer_key = tls.make_ca(ca_common_name, days=ca_days, now=now)
        actions.append(ACTION_RENEWED_CA if bundle else ACTION_CREATED_CA)
        serving_ok = False

    if signer_key:
        carried = bundle or _split_bundle(previous_ca_bundle_pem)
        retire_at = tls.load_certificate(signer).not_valid_before_utc + tls.BACKDATE + ca_overlap
        kept = list(dict.fromkeys(p for p in carried if p != signer and _still_valid(p, now) and now < retire_at))
    else:
        kept = bundle[1:]  # The user's own bundle: theirs to manage.
    if not actions and kept != bundle[1:]:
        actions.append(ACTION_PRUNED_CAS)
    new_bundle = b"".join([signer, *kept])

    if serving_ok and current is not None:
        cert_pem, key_pem = current.cert_pem, current.key_pem
    else:
        cert_pem, key_pem = tls.make_serving_cert(signer, signer_key, list(dns_names), days=cert_days, now=now)
        actions.append(ACTION_ISSUED_CERT)

    if not actions and current is not None:
        return Plan(current)
    return Plan(Material(new_bundle, cert_pem, key_pem, signer_key), tuple(actions))
