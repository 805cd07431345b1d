"""An in-memory Kubernetes API server for tests and demos, served over real HTTPS.

    from kubemcsa.testing import ApiServer
    with ApiServer(name="cluster1") as server:
        client = server.admin_client()          # kubernetes.client.ApiClient
        server.write_kubeconfig("kubeconfig")   # for kubectl or another process

It stores objects, watches, service-account tokens (TokenRequest, TokenReview, legacy Secrets), RBAC, CRDs and
their custom resources, mutating webhooks, garbage collection and discovery, closely enough that the official
client and kubectl cannot tell it from kube-apiserver for what this project uses. The pytest fixtures
`api_server_factory`, `cluster1` and `cluster2` are in kubemcsa.testing.pytest_plugin.
"""

from kubemcsa.testing.errors import StatusError
from kubemcsa.testing.server import ApiServer, RequestRecord

__all__ = ["ApiServer", "RequestRecord", "StatusError"]
