"""A throwaway CA and serving certificate for the in-memory API server, made with the webhook's own
kubemcsa.client.tls."""

from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

from kubemcsa.client import tls


@dataclass(frozen=True)
class ServingCerts:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # the key must never be printed
        return "ServingCerts(<redacted>)"

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain wants files; write them to a private temporary directory and remove it at once.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
            with open(cert, "wb") as f:
                f.write(self.cert_pem + self.ca_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.key_pem)
            ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def make_serving_certs(
    common_name: str = "kube-apiserver",
    dns_names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> ServingCerts:
    """A new CA and a certificate it signs for `dns_names` and `ips`, valid for ten years."""
    ca_pem, ca_key_pem = tls.make_ca(f"{common_name}-ca", days=3650)
    cert_pem, key_pem = tls.make_serving_cert(ca_pem, ca_key_pem, list(dns_names), ips, days=3650)
    return ServingCerts(ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem)
