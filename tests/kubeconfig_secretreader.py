"""A test re-implementation of the cluster-inventory-api's standard `kubeconfig-secretreader` exec plugin.

Written from its upstream source (kubernetes-sigs/cluster-inventory-api, plugins/kubeconfig-secretreader/cmd/
plugin/main.go and pkg/credentialplugin/core.go), behaviour for behaviour, so that the ClusterProfiles this
project writes are shown to work with that plugin unchanged:
- KUBERNETES_EXEC_INFO must be a client.authentication.k8s.io/v1 ExecCredential whose spec.cluster.server is set;
- spec.cluster.config (the `client.authentication.k8s.io/exec` extension) needs `name` and `key`; `namespace`
  and `context` are optional (namespace: the kubeconfig's current-context namespace, else "default");
- the Secret is read with the plugin's own identity (in-cluster first, else $KUBECONFIG), and its data[key]
  parsed as a kubeconfig; kubeconfig `extensions` are rejected; the context is `context` or current-context;
- the user's `token` and/or inline client certificate and key are returned; file paths are refused, and a user
  with neither (a tokenFile alone, say) is an error;
- it prints {"apiVersion", "kind", "status"} (no expirationTimestamp) on stdout; an error is
  "[kubeconfig-secretreader] ..." on stderr and exit status 1.
Run as `python tests/kubeconfig_secretreader.py`.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any, NoReturn

import yaml
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

PLUGIN = "kubeconfig-secretreader"


def fail(message: str) -> NoReturn:
    print(f"[{PLUGIN}] {message}", file=sys.stderr)
    sys.exit(1)


def client() -> ApiClient:
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        kube_config.load_kube_config(os.environ.get("KUBECONFIG"), client_configuration=configuration)
    return ApiClient(configuration)


def infer_namespace() -> str:
    try:
        _, current = kube_config.list_kube_config_contexts(os.environ.get("KUBECONFIG"))
        namespace = (current.get("context") or {}).get("namespace") or ""
    except (kube_config.ConfigException, OSError, TypeError):
        namespace = ""
    return namespace.strip() or "default"


def read_exec_info() -> dict[str, Any]:
    try:
        info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
    except (KeyError, ValueError) as exc:
        fail(f"failed to read KUBERNETES_EXEC_INFO: {type(exc).__name__}")
    if info.get("apiVersion") != "client.authentication.k8s.io/v1" or info.get("kind") != "ExecCredential":
        fail(f"unexpected ExecCredential type (expect v1), got {info.get('apiVersion')}")
    cluster = (info.get("spec") or {}).get("cluster")
    if not cluster or not str(cluster.get("server") or "").strip() or cluster.get("server") == "null":
        fail("spec.cluster.server is missing in KUBERNETES_EXEC_INFO")
    return info


def get_token(info: dict[str, Any]) -> dict[str, str]:
    raw = info["spec"]["cluster"].get("config")
    if not raw:
        fail("missing ExecCredential.Spec.Cluster.Config")
    if not isinstance(raw, dict):
        fail("invalid ExecCredential.Spec.Cluster.Config")
    name, key = raw.get("name") or "", raw.get("key") or ""
    if not name:
        fail("missing name in ExecCredential.Spec.Cluster.Config")
    if not key:
        fail("missing key in ExecCredential.Spec.Cluster.Config")
    namespace = raw.get("namespace") or infer_namespace()
    api = client()
    try:
        secret = api.call_api(
            *api.param_serialize("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}", auth_settings=["BearerToken"])
        )
        secret.read()
        if not 200 <= secret.status <= 299:
            raise ApiException(status=secret.status, reason=secret.reason)
        body = json.loads(secret.data)
    except ApiException as exc:
        fail(f"failed to get secret {namespace}/{name}: {exc.status} {exc.reason}")
    value = (body.get("data") or {}).get(key)
    if not value:
        fail(f'secret {namespace}/{name} missing "{key}" key')
    try:
        kubeconfig = yaml.safe_load(base64.b64decode(value))
    except (ValueError, yaml.YAMLError):
        fail(f"failed to parse kubeconfig from secret {namespace}/{name}")
    if not isinstance(kubeconfig, dict):
        fail(f"failed to parse kubeconfig from secret {namespace}/{name}")
    if kubeconfig.get("extensions"):
        fail("kubeconfig extensions are not supported")
    context_name = raw.get("context") or kubeconfig.get("current-context") or ""
    if not context_name:
        fail("no context specified and no current-context in kubeconfig")
    contexts = {c["name"]: c.get("context") or {} for c in kubeconfig.get("contexts") or []}
    if context_name not in contexts:
        fail(f'context "{context_name}" not found in kubeconfig')
    user_name = contexts[context_name].get("user")
    users = {u["name"]: u.get("user") or {} for u in kubeconfig.get("users") or []}
    if user_name not in users:
        fail(f'user "{user_name}" not found in kubeconfig')
    user = users[user_name]
    status: dict[str, str] = {}
    if user.get("token"):
        status["token"] = user["token"]
    has_cert = bool(user.get("client-certificate-data") or user.get("client-certificate"))
    has_key = bool(user.get("client-key-data") or user.get("client-key"))
    if has_cert or has_key:
        if not has_cert:
            fail(f'client-key-data found but no client-certificate-data in user "{user_name}"')
        if not has_key:
            fail(f'client-certificate-data found but no client-key-data in user "{user_name}"')
        if user.get("client-certificate-data"):
            status["clientCertificateData"] = base64.b64decode(user["client-certificate-data"]).decode()
        else:
            fail("client-certificate file path is not supported; use client-certificate-data")
        if user.get("client-key-data"):
            status["clientKeyData"] = base64.b64decode(user["client-key-data"]).decode()
        else:
            fail("client-key file path is not supported; use client-key-data")
    if not status.get("token") and not status.get("clientCertificateData"):
        fail(
            f'no authentication method found in user "{user_name}" '
            "(neither token nor client-certificate-data/client-key-data)"
        )
    return status


def main() -> None:
    status = get_token(read_exec_info())
    credential = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}
    sys.stdout.write(json.dumps(credential) + "\n")


if __name__ == "__main__":
    main()
