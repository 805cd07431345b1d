"""Certificate primitives for the webhook's TLS (pure: bytes and datetimes in, bytes and decisions out).

Keys are ECDSA P-256: fast to generate, accepted by every TLS stack Kubernetes uses. Nothing here talks to the
API or reads files; `kubemcsa.certificates.plan` decides what to (re)issue and `kubemcsa.certificates.manager` stores
the result.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 365
DEFAULT_RENEW_BEFORE = datetime.timedelta(days=30)
# Issued certificates start a little in the past so that a peer whose clock lags ours still accepts them.
BACKDATE = datetime.timedelta(hours=1)
# A certificate that is not yet valid by more than this is treated as broken (clock jump, wrong issuer clock).
CLOCK_SKEW = datetime.timedelta(minutes=5)

_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


class CertificateFormatError(ValueError):
    """PEM input that is not what it should be (never carries key material in its message)."""


def as_utc(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.UTC)
    return now.astimezone(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in order; raises CertificateFormatError if there are none or one is bad."""
    if not isinstance(pem, bytes | bytearray) or _PEM_BEGIN not in pem:
        raise CertificateFormatError("no PEM certificate found")
    try:
        return x509.load_pem_x509_certificates(bytes(pem))
    except ValueError:
        raise CertificateFormatError("malformed PEM certificate") from None


def load_certificate(pem: bytes) -> x509.Certificate:
    """The first certificate of a PEM bundle."""
    return load_certificates(pem)[0]


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """An unencrypted ECDSA private key; the error never includes the input."""
    try:
        key = serialization.load_pem_private_key(bytes(pem), password=None)
    except (ValueError, TypeError, AttributeError):
        raise CertificateFormatError("malformed or encrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateFormatError("private key is not an ECDSA key")
    return key


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    """True if `key_pem` is the private key of the (first) certificate in `cert_pem`; False on any bad input."""
    try:
        cert = load_certificate(cert_pem)
        key = load_private_key(key_pem)
    except CertificateFormatError:
        return False
    return cert.public_key() == key.public_key()


def make_ca(
    common_name: str, *, days: int = DEFAULT_CA_DAYS, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A self-signed CA (basicConstraints CA:true, pathlen 0, keyCertSign): (cert_pem, key_pem)."""
    if days <= 0:
        raise ValueError(f"a CA must be valid for at least one day, not {days}")
    start = as_utc(now)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "webhook-ca")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def make_serving_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    dns_names: Sequence[str],
    ip_addresses: Iterable[str] = (),
    *,
    days: int = DEFAULT_CERT_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A serving certificate (serverAuth, SANs) signed by the CA: (cert_pem, key_pem).

    It never outlives the CA, so a client trusting the CA never sees a certificate whose issuer has expired.
    """
    if not dns_names:
        raise ValueError("a serving certificate needs at least one DNS name")
    if days <= 0:
        raise ValueError(f"a serving certificate must be valid for at least one day, not {days}")
    ca_cert = load_certificate(ca_cert_pem)
    ca_key = load_private_key(ca_key_pem)
    if ca_cert.public_key() != ca_key.public_key():
        raise CertificateFormatError("the CA private key does not belong to the CA certificate")
    start = as_utc(now)
    end = min(start + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    key = _new_key()
    sans: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start - BACKDATE, ca_cert.not_valid_before_utc))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _cert_pem(cert), _key_pem(key)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a client may use for a Service, most specific (the one the API server uses) first."""
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
    ]


def not_after(cert_pem: bytes) -> datetime.datetime:
    """When the (first) certificate expires, timezone-aware UTC."""
    return load_certificate(cert_pem).not_valid_after_utc


def dns_names_of(cert: x509.Certificate) -> list[str]:
    """The DNS SANs of a certificate (empty if it has none)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.DNSName)


def is_ca(cert: x509.Certificate) -> bool:
    """True if the certificate may sign others (basicConstraints CA:true and, when present, keyCertSign)."""
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def is_signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """True if `ca` directly issued `cert` (issuer name matches and the signature verifies)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def needs_renewal(
    cert_pem: bytes,
    ca_pem: bytes,
    dns_names: Iterable[str],
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = DEFAULT_RENEW_BEFORE,
) -> bool:
    """True if the serving certificate must be (re)issued: malformed, expired or expiring within `renew_before`,
    not yet valid, missing one of `dns_names`, or not signed by the CA (the first certificate of `ca_pem`).

    Never raises: anything it cannot parse needs renewal.
    """
    current = as_utc(now)
    try:
        cert = load_certificate(cert_pem)
        ca = load_certificate(ca_pem)
    except CertificateFormatError:
        return True
    if cert.not_valid_after_utc - current < renew_before:
        return True
    if cert.not_valid_before_utc - current > CLOCK_SKEW:
        return True
    if not set(dns_names) <= set(dns_names_of(cert)):
        return True
    return not (is_ca(ca) and is_signed_by(cert, ca))
