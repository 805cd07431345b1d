"""How a test reaches a cluster, in-memory or real: its admin kubeconfig, a kubeconfig file (mode 0600: it holds a
token), and clients of the official `kubernetes` package. One home for ApiServer and ControlPlane alike."""

from __future__ import annotations

import base64
import os
import time
from typing import Any

import yaml

MOUNTED_AGO = 5.0  # seconds: longer than the controller's settle time (controller.source_clusters.SETTLE_SECONDS)


class ClusterClients:
    """Mixed into a cluster that has `name`, `url`, `ca_pem` and `admin_token`."""

    name: str
    url: str
    ca_pem: bytes
    admin_token: str

    def kubeconfig(
        self, context: str | None = None, token: str | None = None, namespace: str | None = None
    ) -> dict[str, Any]:
        """A kubeconfig dict for this cluster: the admin token unless `token` is given."""
        context = context or self.name
        user = f"{self.name}-admin" if token is None else f"{self.name}-user"
        ctx: dict[str, Any] = {"cluster": self.name, "user": user}
        if namespace:
            ctx["namespace"] = namespace
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": self.name,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token if token is not None else self.admin_token}}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
            "preferences": {},
        }

    def write_kubeconfig(
        self, path: str | os.PathLike[str], context: str | None = None, token: str | None = None
    ) -> str:
        """Write the kubeconfig (mode 0600: it holds a token) and return its path.

        Its modification time is set back MOUNTED_AGO seconds, as that of a file mounted before the process that
        reads it starts: the controller waits for a source kubeconfig written under a second ago to settle (a writer
        may pause between two writes), which would otherwise cost every test that starts a controller a second."""
        text = yaml.safe_dump(self.kubeconfig(context=context, token=token), sort_keys=False)
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        back = time.time_ns() - int(MOUNTED_AGO * 1e9)
        os.utime(path, ns=(back, back))
        return os.fspath(path)

    def admin_client(self) -> Any:
        return self.client_for_token(self.admin_token)

    def client_for_token(self, token: str) -> Any:
        from kubernetes import config

        return config.new_client_from_config_dict(self.kubeconfig(token=token))
