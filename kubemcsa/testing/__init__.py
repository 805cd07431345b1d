"""An in-memory Kubernetes API server for tests and demos (filled in by issue 2)."""
