"""multicluster-service-account: import Kubernetes service accounts from other clusters."""

__version__ = "0.6.0"
