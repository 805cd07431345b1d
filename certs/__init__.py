"""The admission webhook's TLS: a private CA and serving certificate, kept in a Secret and trusted through caBundle.

- `kubemcsa.client.tls`: issue a CA and a serving certificate (ECDSA P-256), decide whether one needs renewal (pure).
- `kubemcsa.certificates.plan`: what the Secret should hold, given what it holds and the time (pure).
- `kubemcsa.certificates.manager`: `ensure_webhook_certificates` (Secret + caBundle, safe with many replicas) and
`write_files`.
- `kubemcsa.certificates.reloader`: `CertificateReloader` (swap a running server's certificate) and `RenewalLoop`.
- `python -m certs`: the one-shot setup (manifests/certs); manifests/cert-manager is the cert-manager alternative.
"""
