"""The admission webhook that mounts ServiceAccountImport Secrets into annotated pods.

The decision (pure):
- `mutation`: what a pod gets (pod, namespace, lookup -> JSON patch or refusal), and what is refused;
- `mounts`: the volumes and mounts an import adds, as the JSON fragments the patch is made of;
- `review`: AdmissionReview bytes in, response bytes out (v1 and v1beta1, bad input included).

What the webhook knows of its cluster:
- `lookups`: the known imports and namespaces as plain data, and the event loop's dict-only view of them (no
  Kubernetes client: the serving workers use it alone); an import's spec is read by `kubemcsa.contract.spec`;
- `cache`: `WatchCache`, the watches that fill them, and the one API call on a miss.

Serving:
- `app`: the ASGI application (/mutate-pods, /healthz, /readyz, /metrics); `metrics`, its Prometheus metrics;
  `parsing`, the process that parses large bodies;
- `server`: `WebhookServer`, uvicorn over TLS in a thread (certificate reload, health port, graceful stop), with
  `connections` (read deadline, connection caps) and `coalesce` (one TLS record per answer);
- `workers` / `worker`: `--workers N`, one watching process feeding N serving processes that share the port;
- `cli`: the command line's flags; `__main__`: `kubemcsa-webhook` / `python -m webhook`, which runs them.
"""
