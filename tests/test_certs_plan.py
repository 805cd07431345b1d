"""kubemcsa.certificates.plan: what the certificate Secret should hold, given what it holds and the time (pure,
no API)."""

import base64
import dataclasses
import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa.certificates import plan as planning
from kubemcsa.client import tls

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
NAMES = tls.service_dns_names("webhook", "mcsa")


@pytest.fixture(scope="module")
def initial():
    return planning.plan(None, NAMES, NOW)


def _bundle_certs(material):
    return tls.load_certificates(material.ca_bundle_pem)


def test_from_nothing_creates_a_ca_and_a_serving_certificate(initial):
    assert initial.changed
    assert initial.actions == (planning.ACTION_CREATED_CA, planning.ACTION_ISSUED_CERT)
    material = initial.material
    assert len(_bundle_certs(material)) == 1
    assert tls.key_matches(material.ca_bundle_pem, material.ca_key_pem)
    assert tls.key_matches(material.cert_pem, material.key_pem)
    assert not tls.needs_renewal(material.cert_pem, material.ca_bundle_pem, NAMES, NOW)


def test_a_second_plan_changes_nothing(initial):
    again = planning.plan(initial.material, NAMES, NOW + 100 * DAY)
    assert not again.changed
    assert again.material is initial.material


def test_an_expiring_serving_certificate_is_renewed_with_the_same_ca(initial):
    later = tls.not_after(initial.material.cert_pem) - 10 * DAY
    renewed = planning.plan(initial.material, NAMES, later)
    assert renewed.actions == (planning.ACTION_ISSUED_CERT,)
    assert renewed.material.ca_bundle_pem == initial.material.ca_bundle_pem
    assert renewed.material.ca_key_pem == initial.material.ca_key_pem
    assert renewed.material.cert_pem != initial.material.cert_pem
    assert renewed.material.key_pem != initial.material.key_pem
    assert not tls.needs_renewal(renewed.material.cert_pem, renewed.material.ca_bundle_pem, NAMES, later)


def test_new_service_names_reissue_the_serving_certificate(initial):
    names = tls.service_dns_names("webhook2", "mcsa")
    renewed = planning.plan(initial.material, names, NOW)
    assert renewed.actions == (planning.ACTION_ISSUED_CERT,)
    assert tls.dns_names_of(tls.load_certificate(renewed.material.cert_pem)) == names


def test_an_expiring_ca_is_renewed_and_the_old_one_stays_trusted_during_the_overlap(initial):
    ca_expiry = tls.not_after(initial.material.ca_bundle_pem)
    when = ca_expiry - 300 * DAY
    renewed = planning.plan(initial.material, NAMES, when)
    assert renewed.actions == (planning.ACTION_RENEWED_CA, planning.ACTION_ISSUED_CERT)
    new_ca, old_ca = _bundle_certs(renewed.material)
    assert old_ca == tls.load_certificate(initial.material.ca_bundle_pem)
    assert tls.is_signed_by(tls.load_certificate(renewed.material.cert_pem), new_ca)
    assert tls.key_matches(renewed.material.ca_bundle_pem, renewed.material.ca_key_pem)

    # During the overlap nothing changes; after it the old CA leaves the bundle.
    assert not planning.plan(renewed.material, NAMES, when + 6 * DAY).changed
    pruned = planning.plan(renewed.material, NAMES, when + planning.DEFAULT_CA_OVERLAP + DAY)
    assert pruned.actions == (planning.ACTION_PRUNED_CAS,)
    assert _bundle_certs(pruned.material) == [new_ca]
    assert pruned.material.cert_pem == renewed.material.cert_pem


def test_an_old_ca_that_expires_during_the_overlap_leaves_at_its_expiry(initial):
    ca_expiry = tls.not_after(initial.material.ca_bundle_pem)
    renewed = planning.plan(initial.material, NAMES, ca_expiry - 300 * DAY).material
    long_overlap = {"ca_overlap": 1000 * DAY}
    assert not planning.plan(renewed, NAMES, ca_expiry - DAY, **long_overlap).changed
    pruned = planning.plan(renewed, NAMES, ca_expiry + DAY, **long_overlap)
    assert pruned.actions == (planning.ACTION_PRUNED_CAS,)


def test_a_lost_secret_keeps_trusting_what_the_webhook_configuration_trusted(initial):
    # The Secret was deleted: the new CA is created, and the CA the webhook configuration trusted (that replicas
    # not yet renewed still serve) stays trusted for the overlap.
    previous = initial.material.ca_bundle_pem
    fresh = planning.plan(None, NAMES, NOW + DAY, previous_ca_bundle_pem=previous + b"junk")
    assert fresh.actions == (planning.ACTION_CREATED_CA, planning.ACTION_ISSUED_CERT)
    new_ca, old_ca = _bundle_certs(fresh.material)
    assert old_ca == tls.load_certificate(previous)
    assert tls.is_signed_by(tls.load_certificate(fresh.material.cert_pem), new_ca)
    assert not planning.plan(fresh.material, NAMES, NOW + 2 * DAY).changed
    pruned = planning.plan(fresh.material, NAMES, NOW + DAY + planning.DEFAULT_CA_OVERLAP + DAY)
    assert pruned.actions == (planning.ACTION_PRUNED_CAS,)
    # A Secret that still has its CA ignores what the configuration trusts (it is patched to match instead).
    other = planning.plan(None, NAMES, NOW).material.ca_bundle_pem
    assert not planning.plan(initial.material, NAMES, NOW, previous_ca_bundle_pem=other).changed


def test_a_mismatched_key_reissues_the_serving_certificate(initial):
    broken = dataclasses.replace(initial.material, key_pem=initial.material.ca_key_pem)
    assert planning.plan(broken, NAMES, NOW).actions == (planning.ACTION_ISSUED_CERT,)


def test_a_lost_ca_key_means_a_new_ca_only_when_the_certificate_needs_renewal(initial):
    # A pair brought by the user (no ca.key) is kept while it is fine...
    users = dataclasses.replace(initial.material, ca_key_pem=b"")
    assert not planning.plan(users, NAMES, NOW).changed
    # ...and replaced by our own CA when it needs renewal, the user's CA staying trusted meanwhile.
    later = tls.not_after(users.cert_pem) - DAY
    renewed = planning.plan(users, NAMES, later)
    assert renewed.actions == (planning.ACTION_RENEWED_CA, planning.ACTION_ISSUED_CERT)
    assert len(_bundle_certs(renewed.material)) == 2


def test_garbage_in_the_secret_is_replaced(initial):
    garbage = planning.Material(b"junk", b"junk", b"junk", b"junk")
    fixed = planning.plan(garbage, NAMES, NOW)
    assert fixed.actions == (planning.ACTION_CREATED_CA, planning.ACTION_ISSUED_CERT)
    assert len(_bundle_certs(fixed.material)) == 1


def test_lifetimes_shorter_than_the_renewal_windows_are_refused():
    with pytest.raises(ValueError, match="cert_days"):
        planning.plan(None, NAMES, NOW, cert_days=20)
    with pytest.raises(ValueError, match="ca_days"):
        planning.plan(None, NAMES, NOW, ca_days=100)


def test_secret_data_round_trip_and_repr_hides_keys(initial):
    data = planning.material_to_secret_data(initial.material)
    assert set(data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert planning.material_from_secret_data(data) == initial.material
    text = repr(initial.material)
    assert "PRIVATE" not in text and data["tls.key"] not in text and "hidden" in text


def test_secret_data_without_ca_key_and_with_bad_values():
    assert planning.material_from_secret_data(None) is None
    assert planning.material_from_secret_data({}) is None
    assert planning.material_from_secret_data({"tls.crt": "%%%not base64"}) is None
    material = planning.material_from_secret_data({"tls.crt": base64.b64encode(b"x").decode(), "tls.key": 3})
    assert material == planning.Material(b"", b"x", b"", b"")
    assert "ca.key" not in planning.material_to_secret_data(material)


@settings(max_examples=50, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["ca.crt", "ca.key", "tls.crt", "tls.key", "other"]),
        st.one_of(st.text(max_size=50), st.binary(max_size=50).map(lambda b: base64.b64encode(b).decode())),
    )
)
def test_any_secret_content_yields_a_valid_plan(data):
    decided = planning.plan(planning.material_from_secret_data(data), NAMES, NOW)
    material = decided.material
    assert not tls.needs_renewal(material.cert_pem, material.ca_bundle_pem, NAMES, NOW)
    assert tls.key_matches(material.cert_pem, material.key_pem)
