"""kubemcsa.client.tls: CA and serving certificates, and when a serving certificate must be renewed (pure, no API)."""

import datetime
import ipaddress

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from kubemcsa.client import tls

NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)
NAMES = tls.service_dns_names("webhook", "mcsa")


@pytest.fixture(scope="module")
def ca():
    return tls.make_ca("test-ca", now=NOW)


@pytest.fixture(scope="module")
def serving(ca):
    return tls.make_serving_cert(*ca, NAMES, ["10.0.0.1"], now=NOW)


def test_service_dns_names_put_the_api_servers_name_first():
    assert tls.service_dns_names("webhook", "mcsa") == [
        "webhook.mcsa.svc",
        "webhook.mcsa.svc.cluster.local",
        "webhook.mcsa",
        "webhook",
    ]


def test_ca_is_a_ca_that_signs_certificates(ca):
    cert = tls.load_certificate(ca[0])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert tls.is_ca(cert)
    assert tls.key_matches(*ca)
    assert tls.not_after(ca[0]) == NOW + datetime.timedelta(days=tls.DEFAULT_CA_DAYS)


def test_serving_certificate_has_the_sans_server_auth_and_the_ca_as_issuer(ca, serving):
    cert = tls.load_certificate(serving[0])
    assert tls.dns_names_of(cert) == NAMES
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not tls.is_ca(cert)
    assert tls.is_signed_by(cert, tls.load_certificate(ca[0]))
    assert tls.key_matches(*serving)
    assert not tls.key_matches(serving[0], ca[1])
    assert tls.not_after(serving[0]) == NOW + datetime.timedelta(days=tls.DEFAULT_CERT_DAYS)
    assert cert.not_valid_before_utc <= NOW


def test_serving_certificate_never_outlives_its_ca():
    short_ca = tls.make_ca("short", days=10, now=NOW)
    cert_pem, _ = tls.make_serving_cert(*short_ca, NAMES, days=365, now=NOW)
    assert tls.not_after(cert_pem) == tls.not_after(short_ca[0])


def test_serving_certificate_refuses_bad_arguments(ca):
    with pytest.raises(ValueError, match="at least one DNS name"):
        tls.make_serving_cert(*ca, [], now=NOW)
    with pytest.raises(ValueError, match="at least one day"):
        tls.make_serving_cert(*ca, NAMES, days=0, now=NOW)
    other = tls.make_ca("other", now=NOW)
    with pytest.raises(tls.CertificateFormatError, match="does not belong"):
        tls.make_serving_cert(ca[0], other[1], NAMES, now=NOW)
    with pytest.raises(tls.CertificateFormatError):
        tls.make_serving_cert(b"junk", ca[1], NAMES, now=NOW)


def test_a_fresh_certificate_needs_no_renewal(ca, serving):
    assert not tls.needs_renewal(serving[0], ca[0], NAMES, NOW)
    # A subset of the names it was issued for is fine too.
    assert not tls.needs_renewal(serving[0], ca[0], NAMES[:1], NOW)


def test_renewal_is_due_within_renew_before_and_after_expiry(ca, serving):
    expiry = tls.not_after(serving[0])
    assert not tls.needs_renewal(serving[0], ca[0], NAMES, expiry - datetime.timedelta(days=31))
    assert tls.needs_renewal(serving[0], ca[0], NAMES, expiry - datetime.timedelta(days=29))
    assert tls.needs_renewal(serving[0], ca[0], NAMES, expiry + datetime.timedelta(seconds=1))
    assert tls.needs_renewal(serving[0], ca[0], NAMES, NOW, renew_before=datetime.timedelta(days=400))


def test_renewal_is_due_for_a_certificate_from_the_future(ca, serving):
    assert tls.needs_renewal(serving[0], ca[0], NAMES, NOW - datetime.timedelta(days=1))


def test_renewal_is_due_for_other_names(ca, serving):
    assert tls.needs_renewal(serving[0], ca[0], ["webhook.other.svc"], NOW)
    assert tls.needs_renewal(serving[0], ca[0], [*NAMES, "extra.mcsa.svc"], NOW)


def test_renewal_is_due_when_another_ca_signed_it(ca, serving):
    other_ca = tls.make_ca("test-ca", now=NOW)  # same name, different key
    assert tls.needs_renewal(serving[0], other_ca[0], NAMES, NOW)
    # A serving certificate is not a CA, even for itself.
    assert tls.needs_renewal(serving[0], serving[0], NAMES, NOW)


@pytest.mark.parametrize(
    "cert_pem",
    [b"", b"junk", b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "text"],
)
def test_malformed_certificates_need_renewal(ca, cert_pem):
    assert tls.needs_renewal(cert_pem, ca[0], NAMES, NOW)


def test_malformed_ca_means_renewal(serving):
    assert tls.needs_renewal(serving[0], b"junk", NAMES, NOW)


def test_key_errors_never_contain_the_input():
    secret = b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    with pytest.raises(tls.CertificateFormatError) as info:
        tls.load_private_key(secret)
    assert "c2VjcmV0" not in str(info.value)
    assert info.value.__cause__ is None


def test_naive_datetimes_are_taken_as_utc(ca):
    naive = NOW.replace(tzinfo=None)
    cert_pem, _ = tls.make_serving_cert(*ca, NAMES, now=naive)
    assert tls.not_after(cert_pem) == NOW + datetime.timedelta(days=tls.DEFAULT_CERT_DAYS)
    assert not tls.needs_renewal(cert_pem, ca[0], NAMES, naive)


@settings(max_examples=200, deadline=None)
@given(cert_pem=st.binary(max_size=3000), ca_pem=st.binary(max_size=300))
def test_needs_renewal_never_raises_on_garbage(cert_pem, ca_pem):
    assert tls.needs_renewal(cert_pem, ca_pem, NAMES, NOW) is True


@settings(max_examples=100, deadline=None)
@given(pem=st.binary(max_size=2000))
def test_key_matches_never_raises_on_garbage(pem, serving):
    assert tls.key_matches(pem, serving[1]) is False
    assert tls.key_matches(serving[0], pem) is False
