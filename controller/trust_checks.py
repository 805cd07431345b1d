"""Federated source clusters, as the controller sees them: their records and whether they trust this cluster.

- `FederatedSources` reads the ConfigMaps `kubemcsa federate` writes in the system namespace, from a label-selected
  cache: a source added or changed is used at once, without a restart.
- `TrustChecks` asks a source whether it accepts this cluster's tokens: a token of the trust-check service account
  (`multicluster-service-account-trust-check`, bound to nothing: never the controller's own identity), requested
  from the local cluster for an audience the source's record allows, sent to the source's SelfSubjectReview. A
  token that leaks there (to its admins, a proxy, its token webhook) is worth nothing in this cluster, and no
  import can aim it at another audience. One answer per source and audience serves every import of it until it
  is stale (a refusal is asked again sooner than an acceptance), and one check at a time is made for it, so the
  number of checks does not grow with the number of imports.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.model import NeedsTrustCheck, Trust
from kubemcsa.client import kube, tokens
from kubemcsa.client import trust as trust_api
from kubemcsa.client.informer import Informer
from kubemcsa.contract import api, federation
from kubemcsa.contract.federation import FederatedSource, FederationError

log = logging.getLogger(__name__)

# The shortest token the TokenRequest API gives; it only lives for one SelfSubjectReview.
CHECK_TOKEN_SECONDS = 600


class FederatedSources:
    """The federated source clusters recorded in the system namespace, from a cache of their ConfigMaps."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer

    def _records(self) -> list[dict[str, Any]]:
        return [obj for obj in self.informer.list() if federation.is_source_configmap(obj)]

    def get(self, cluster_name: str) -> tuple[FederatedSource | None, str | None]:
        """The source named `cluster_name`, or (None, why its record is unusable) / (None, None) if unknown."""
        for obj in self._records():
            data = obj.get("data") if isinstance(obj.get("data"), dict) else {}
            if data.get(federation.KEY_CLUSTER_NAME) != cluster_name:
                continue
            try:
                return federation.source_from_configmap(obj), None
            except FederationError as exc:
                return None, str(exc)
        return None, None

    def names(self) -> tuple[str, ...]:
        names = []
        for obj in self._records():
            name = (obj.get("data") or {}).get(federation.KEY_CLUSTER_NAME)
            if isinstance(name, str):
                names.append(name)
        return tuple(sorted(set(names)))


def _fingerprint(source: FederatedSource, audience: str) -> str:
    material = "\0".join([source.cluster_name, source.server, source.user_prefix, audience])
    return hashlib.sha256(material.encode() + b"\0" + source.ca_pem).hexdigest()[:16]


def parse_service_account(value: str) -> tuple[str, str]:
    """(namespace, name) of "NAMESPACE/NAME"; ValueError naming the expected form."""
    namespace, _, name = value.partition("/")
    if not (api.is_dns_label(namespace) and api.is_dns_subdomain(name)):
        raise ValueError(f"{value!r} is not NAMESPACE/NAME of a service account")
    return namespace, name


class TrustChecks:
    """The last answer of each federated source about this cluster's tokens, and how to ask again."""

    def __init__(
        self,
        local_client: ApiClient,
        *,
        check_identity: tuple[str, str],
        trusted_seconds: float,
        untrusted_seconds: float,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.local_client = local_client
        self.check_identity = check_identity  # (namespace, name) of the trust-check service account
        self.trusted_seconds = trusted_seconds
        self.untrusted_seconds = untrusted_seconds
        self.timeout = timeout
        self.clock = clock
        self._answers: dict[tuple[str, str], tuple[str, Trust]] = {}
        self._checking: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def cached(self, source: FederatedSource, audience: str) -> Trust | None:
        """The last answer for this source (as recorded now) and audience, if any; assess decides if it is stale."""
        with self._lock:
            entry = self._answers.get((source.cluster_name, audience))
        if entry is None or entry[0] != _fingerprint(source, audience):
            return None
        return entry[1]

    def forget(self, cluster_name: str) -> None:
        with self._lock:
            for key in [k for k in self._answers if k[0] == cluster_name]:
                del self._answers[key]

    def check(self, need: NeedsTrustCheck) -> Trust:
        """Ask the source, remember and return its answer (the token is never kept or shown). One check at a time
        per source and audience: workers that need the same answer wait for it instead of asking again."""
        with self._lock:
            key_lock = self._checking.setdefault((need.source.cluster_name, need.audience), threading.Lock())
        with key_lock:
            fresh = self.cached(need.source, need.audience)
            if fresh is not None and self.clock() < fresh.valid_until:
                return fresh
            return self._check(need)

    def _check(self, need: NeedsTrustCheck) -> Trust:
        source, audience = need.source, need.audience
        now = self.clock()
        if audience not in source.allowed_audiences:  # assess refuses these; never mint one for the source anyway
            answer = trust_api.TrustCheck(
                None, f"The record of federated cluster {source.cluster_name} does not allow that audience"
            )
        else:
            answer = self._ask(source, audience)
        seconds = self.trusted_seconds if answer.trusted else self.untrusted_seconds
        trust = Trust(source.cluster_name, audience, answer.username, answer.problem, now + seconds)
        with self._lock:
            self._answers[(source.cluster_name, audience)] = (_fingerprint(source, audience), trust)
        if answer.trusted:
            log.info("cluster %s trusts this cluster's tokens (audience %s)", source.cluster_name, audience)
        else:
            log.info("cluster %s does not trust this cluster's tokens yet: %s", source.cluster_name, answer.problem)
        return trust

    def _ask(self, source: FederatedSource, audience: str) -> trust_api.TrustCheck:
        namespace, name = self.check_identity
        try:
            issued = tokens.request_token(
                self.local_client,
                namespace,
                name,
                audiences=(audience,),
                expiration_seconds=CHECK_TOKEN_SECONDS,
                timeout=self.timeout,
                clock=self.clock,
            )
        except ApiException as exc:
            if exc.status == 404:
                fix = "create it (manifests/controller/serviceaccount.yaml), bound to nothing"
            else:
                fix = f"grant the controller create on serviceaccounts/token with resourceNames [{name}] there only"
            return trust_api.TrustCheck(
                None,
                f"The controller could not get a token of the trust-check service account {namespace}/{name} for "
                f"audience {audience} ({exc.status}: {' '.join(kube.error_message(exc).split())[:200]}); {fix} "
                "(manifests/controller), or name another account bound to nothing with --trust-check-service-account",
            )
        except (*kube.CONNECTION_ERRORS, tokens.TokenAnswerError) as exc:
            return trust_api.TrustCheck(
                None, f"The controller could not get a token from the local API server ({type(exc).__name__})"
            )
        answer = trust_api.check_trust(source, issued.token, timeout=self.timeout)
        if answer.trusted or answer.code != 401:
            return answer
        return trust_api.TrustCheck(
            None,
            f"Cluster {source.cluster_name} does not trust this cluster's service-account tokens (401 to a token of "
            f"{namespace}/{name} for audience {audience})",
            401,
        )
