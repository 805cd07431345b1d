"""The Kubernetes client layer: API access, kubeconfigs, token requests, TLS."""
