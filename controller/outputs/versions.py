"""Each source's Kubernetes version, asked once per source (GET /version) and remembered, never per import.

Outputs that describe a source (say, a ClusterProfile's status.version) ask for it; the first import of a
source that needs it makes the one call (the others of that source wait for its answer), and the answer stands
until the controller's credentials for the source change or `refresh_seconds` pass. A failure is remembered
too, for `retry_seconds`, so that a source that does not answer costs one call per period, not one per import.
A federated source is asked without credentials (/version is public in Kubernetes: system:public-info-viewer),
and, while it has imports, again every federated_probe_seconds (controller/run.py): the controller makes no other
call to it in the steady state, so that answer is its only sign of the source's health.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube


def anonymous_client(server: str, ca_pem: bytes) -> ApiClient:
    """A client that calls `server` without credentials, trusting only `ca_pem`."""
    config = Configuration(host=server)
    config.ca_cert_data = ca_pem.decode()
    config.verify_ssl = True
    config.retries = False
    return ApiClient(config)


class SourceVersions:
    def __init__(
        self,
        *,
        timeout: float = 10.0,
        refresh_seconds: float = 3600.0,
        retry_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.timeout = timeout
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self.clock = clock
        self.calls = 0  # GET /version made, for tests and benchmarks
        self._lock = threading.Lock()
        # (federated, cluster): a federated source and a token source may share a name, not an answer
        self._locks: dict[tuple[bool, str], threading.Lock] = {}
        # -> (what the answer depends on, version, problem, valid until, asked at)
        self._known: dict[tuple[bool, str], tuple[tuple[str, str], str | None, str | None, float, float]] = {}

    def get(
        self,
        cluster: str,
        server: str,
        ca_pem: bytes,
        fingerprint: str,
        client: Callable[[], ApiClient] | None,
        *,
        federated: bool = False,
        max_age: float | None = None,
    ) -> tuple[str | None, str | None]:
        """(gitVersion or None, why the source did not answer or None) of `cluster`; `client` builds the
        controller's own client for it (None: ask without credentials). A source that answers without a version
        (anonymous requests refused, say) is reachable: (None, None). `max_age`: ask again if the answer is
        older than that, even if it still stands (a probe of the source's reachability). `federated`: the
        federated source of that name, kept apart from a token source of the same name."""
        key, inputs = (federated, cluster), (server, fingerprint or ca_pem.decode(errors="replace"))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one call per source at a time; the others read its answer
            known = self._known.get(key)
            now = self.clock()
            if (
                known is not None
                and known[0] == inputs
                and now < known[3]
                and (max_age is None or now - known[4] < max_age)
            ):
                return known[1], known[2]
            version, problem = self._ask(server, ca_pem, client)
            period = self.retry_seconds if problem else self.refresh_seconds
            with self._lock:
                self._known[key] = (inputs, version, problem, self.clock() + period, now)
            return version, problem

    def problem(self, cluster: str, *, federated: bool = False) -> str | None:
        """Why `cluster` did not answer its last ask (None: it answered, or was never asked)."""
        with self._lock:
            known = self._known.get((federated, cluster))
        return known[2] if known is not None else None

    def _ask(self, server: str, ca_pem: bytes, client: Callable[[], ApiClient] | None) -> tuple[str | None, str | None]:
        self.calls += 1
        try:
            api_client = client() if client is not None else anonymous_client(server, ca_pem)
            answer: dict[str, Any] = kube.get_path(api_client, "/version", timeout=self.timeout)
        except ApiException:
            return None, None
        except kube.CONNECTION_ERRORS as exc:
            return None, f"it did not answer the controller ({type(exc).__name__})"
        except Exception:  # a kubeconfig the client cannot load, a bad body: the import's own condition says why
            return None, None
        version = answer.get("gitVersion")
        return (version if isinstance(version, str) and version else None), None
