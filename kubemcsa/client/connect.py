"""How a component or a command gets its clients: of the cluster it runs in (in-cluster, else a kubeconfig), or of a
source from a credential; and what went wrong when it cannot, in one sentence.
"""

from __future__ import annotations

import errno

from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration, rest

from kubemcsa.client.kube import _NETWORK_ERRORS
from kubemcsa.client.kubeconfig import load_api_client
from kubemcsa.contract.credentials import Credentials

# OSErrors that come from this machine's files (a read-only root, no /tmp, a missing path), not from the network.
_LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


_LOCAL_FILE_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def local_file_problem(exc: BaseException) -> str | None:
    """What failed, if `exc` is an error of this machine's filesystem rather than of the network; else None."""
    if not isinstance(exc, OSError) or isinstance(exc, _NETWORK_ERRORS):
        return None
    if not (isinstance(exc, _LOCAL_FILE_ERRORS) or exc.errno in _LOCAL_FILE_ERRNOS):
        return None
    detail = exc.strerror or type(exc).__name__
    return f"{detail}: {exc.filename}" if exc.filename else detail


def client_for_credentials(creds: Credentials) -> ApiClient:
    """An ApiClient that calls creds.server as the bearer of creds.token, trusting only creds.ca_crt (no file)."""
    config = Configuration(host=creds.server)
    config.api_key = {"authorization": creds.token}
    config.api_key_prefix = {"authorization": "Bearer"}
    config.ca_cert_data = creds.ca_crt.decode()
    config.verify_ssl = True
    config.retries = False  # one connection attempt per call: callers decide about retrying
    return ApiClient(config)


# What local_api_client raises: no usable configuration, or a file of this machine that could not be used.
LOCAL_CLIENT_ERRORS: tuple[type[BaseException], ...] = (kube_config.ConfigException, OSError, ValueError)


def local_client_problem(exc: BaseException) -> str:
    """What went wrong in local_api_client, for a component's one-line startup error (no final period)."""
    problem = local_file_problem(exc)
    if problem:
        return (
            f"a file on this machine could not be used ({problem}), which is no fault of the cluster configuration; "
            "check the pod's volumes"
        )
    return f"no usable cluster configuration ({exc}); pass --kubeconfig or run in a pod"


def local_api_client(kubeconfig: str | None = None) -> ApiClient:
    """The client of the cluster a component runs in: --kubeconfig, else in-cluster, else KUBECONFIG/~/.kube/config.

    In a pod, the service-account token is a projected token that the kubelet rotates; the in-cluster loader
    re-reads it, so long-running components keep authenticating. A kubeconfig is read by kubemcsa.client.kubeconfig,
    which
    writes nothing to the local filesystem. Raises kubernetes' ConfigException, kubemcsa's ConfigError or OSError.
    """
    if kubeconfig:
        return load_api_client(kubeconfig)
    configuration = Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException:
        return load_api_client()
    return ApiClient(configuration)


def with_room_for(client: ApiClient, connections: int) -> ApiClient:
    """`client`, its pool holding at least `connections` connections to its API server at once.

    The official client sizes its pool by the host's cores (5 each: 5 on one core), whatever its user runs at once;
    past that, each request finds no idle connection, opens one (a TLS handshake on both sides) and throws it
    away after. Call before the client's first request (its pool is made anew).
    """
    if make_room(client.configuration, connections):
        client.rest_client = rest.RESTClientObject(client.configuration)
    return client


def make_room(configuration: Configuration, connections: int) -> bool:
    """Raise `configuration`'s pool size to `connections` (for the clients made from it); True if it was smaller."""
    if (configuration.connection_pool_maxsize or 0) >= connections:
        return False
    configuration.connection_pool_maxsize = connections
    return True
