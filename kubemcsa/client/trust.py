"""Whether a federated source cluster accepts a token of this cluster, and as whom: its SelfSubjectReview.

The token is sent to the source once and never kept, logged or shown; the answer says only who the source sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException

from kubemcsa.client import connect, kube
from kubemcsa.contract.credentials import Credentials
from kubemcsa.contract.federation import FederatedSource


@dataclass(frozen=True)
class TrustCheck:
    """Whether the source accepts a token of this cluster, and as whom; `problem` says what failed (no token)."""

    username: str | None
    problem: str = ""
    code: int | None = None  # the source's HTTP answer when it refused (401: not trusted), None if unreachable

    @property
    def trusted(self) -> bool:
        return self.username is not None


def check_trust(source: FederatedSource, token: str, timeout: float = 10) -> TrustCheck:
    """Send `token` (this cluster's, for an audience the source's record allows, of an identity that holds no
    RBAC here) to the source's SelfSubjectReview."""
    # Imported here: the webhook's serving workers use this module's pure part and never load the client.

    creds = Credentials(server=source.server, ca_crt=source.ca_pem, token=token, namespace="default")
    client = connect.client_for_credentials(creds)
    where = f"cluster {source.cluster_name}"
    try:
        user = kube.whoami(client, timeout=timeout)
    except ApiException as exc:
        if exc.status == 401:
            return TrustCheck(None, f"{where} does not accept this cluster's tokens (401 Unauthorized)", 401)
        detail = " ".join(kube.error_message(exc).split())[:200]
        return TrustCheck(None, f"{where} answered {exc.status} to a SelfSubjectReview ({detail})", exc.status)
    except kube.CONNECTION_ERRORS as exc:
        return TrustCheck(None, f"cannot reach {where} at {source.server} ({type(exc).__name__})")
    finally:
        client.close()
    username = user.get("username")
    if not isinstance(username, str) or not username:
        return TrustCheck(None, f"{where} answered a SelfSubjectReview without a user name", 200)
    return TrustCheck(username)
