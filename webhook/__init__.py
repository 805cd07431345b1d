"""The admission webhook that mounts ServiceAccountImport Secrets into annotated pods.

- `mutation`: the pure decision (pod, namespace, lookup -> JSON patch or refusal);
- `review`: AdmissionReview bytes in, response bytes out (v1 and v1beta1, bad input included);
- `cache`: the watch-fed lookups of imports and namespace labels, with one API call on a miss;
- `app`: the HTTP application (/mutate-pods, /healthz, /readyz, /metrics);
- `__main__`: `kubemcsa-webhook` / `python -m webhook`, and `WebhookServer` (uvicorn over TLS in a thread).
"""
