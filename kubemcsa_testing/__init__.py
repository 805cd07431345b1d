"""An in-memory Kubernetes API server for tests and demos, served over real HTTPS.

    from kubemcsa_testing import ApiServer
    with ApiServer(name="cluster1") as server:
        client = server.admin_client()          # kubernetes.client.ApiClient
        server.write_kubeconfig("kubeconfig")   # for kubectl or another process

It stores objects, watches, service-account tokens (TokenRequest, TokenReview, SelfSubjectReview, legacy Secrets),
RBAC, CRDs and their custom resources, mutating webhooks, garbage collection and discovery, closely enough that the
official client and kubectl cannot tell it from kube-apiserver for what this project uses. Like kube-apiserver
with `--authentication-config`, it can trust another server's service-account tokens
(`ApiServer(authentication_config=...)` or `configure_authentication`, see oidc.py), and `kubelet.Kubelet` writes
a pod's Secret and projected volumes (projected service-account tokens included) as files, as the kubelet does.
The pytest fixtures `api_server_factory`, `cluster1` and `cluster2` are in kubemcsa_testing.pytest_plugin. From a shell:
`python -m kubemcsa_testing --port 6443 --kubeconfig-out kubeconfig` serves until SIGINT/SIGTERM.

Where it knowingly differs from kube-apiserver (tests/test_conformance.py pins down what it shares):
- Nothing runs: pods stay Pending, deployments and jobs are stored only; no scheduler, kubelet or quotas.
- Built-in objects are validated for what clients commonly get wrong (names, labels, Secret data, pod
  containers and mounts, CRDs, webhook configurations, RBAC), not for every field; unknown fields of built-in
  kinds are kept (custom resources are pruned and validated against their schema, Strict included).
- Protobuf request bodies are read only for what kubectl's imperative `create` commands send; answers are JSON.
- No server-side apply (application/apply-patch+yaml is 415), no managedFields, no Table output (kubectl
  falls back to its own printing), no aggregated discovery, no validating admission webhooks.
- Background controllers (garbage collection, namespace deletion, token controller) act within milliseconds;
  a namespace's `default` ServiceAccount exists as soon as the namespace's create returns.
- Watch bookmarks come every second (kube: about a minute), and at the end of a watch.
"""

from importlib.resources import files
from typing import Any

import yaml

from kubemcsa_testing.errors import StatusError
from kubemcsa_testing.server import ApiServer, RequestRecord

__all__ = ["ApiServer", "RequestRecord", "StatusError"]


def crd_manifest() -> dict[str, Any]:
    """The ServiceAccountImport CustomResourceDefinition of manifests/crd (crd.yaml here links to that one file, and a
    build of the package copies it in, so that the demo and tests work from any installation)."""
    return yaml.safe_load(files("kubemcsa_testing").joinpath("crd.yaml").read_text())
