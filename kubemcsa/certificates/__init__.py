"""The admission webhook's TLS: a private CA and serving certificate, kept in a Secret and trusted through caBundle.

Shared by the webhook (`--manage-certificates`) and the one-shot certificate job (`python -m certs`):
- `kubemcsa.client.tls`: issue a CA and a serving certificate (ECDSA P-256), decide whether one needs renewal (pure).
- `plan`: what the Secret should hold, given what it holds and the time (pure).
- `manager`: `ensure_webhook_certificates` (Secret + caBundle, safe with many replicas) and `write_files`.
- `reloader`: `CertificateReloader` (swap a running server's certificate) and `RenewalLoop`.
"""
