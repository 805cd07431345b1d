"""A small generic controller runtime, readable without any reconcile logic.

- `kubemcsa.client.Informer`: a list-watch cache of one resource type (shared with the webhook);
- `queue.WorkQueue`: keys coalesced, delayed re-adds, per-key exponential backoff with jitter;
- `leader.LeaderElector`: a coordination.k8s.io Lease, as client-go's leaderelection;
- `health.HealthServer`: /metrics, /healthz, /readyz;
- `events.EventRecorder`: core/v1 Events on an object;
- `writes.RecentWrites`: read-your-writes over a cache, without comparing resourceVersions;
- `manager.Manager`: starts the above, waits until every cache has synced, then runs workers that call a
  `reconcile(key) -> Result` function, as controller-runtime's Reconcile.
"""
