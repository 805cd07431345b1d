"""Federated source clusters, as the controller sees them: their records and whether they trust this cluster.

- `FederatedSources` reads the ConfigMaps `kubemcsa federate` writes in the system namespace, from a label-selected
  cache: a source added or changed is used at once, without a restart.
- `TrustChecks` asks a source whether it accepts this cluster's tokens: a token of the controller's own service
  account, requested from the local cluster for the source's audience, sent to the source's SelfSubjectReview.
  One answer per source and audience serves every import of it until it is stale (a refusal is asked again
  sooner than an acceptance), and one check at a time is made for it, so the number of checks does not grow
  with the number of imports.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from controller.assess import NeedsTrustCheck, Trust
from kubemcsa import federation, kube, tokens
from kubemcsa.federation import FederatedSource, FederationError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
# The shortest token the TokenRequest API gives; it only lives for one SelfSubjectReview.
CHECK_TOKEN_SECONDS = 600


class FederatedSources:
    """The federated source clusters recorded in the system namespace, from a cache of their ConfigMaps."""

    def __init__(self, informer: kube.Informer) -> None:
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


def service_account_of(username: str) -> tuple[str, str] | None:
    """(namespace, name) of a service account's user name, None for any other user."""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, _, name = username[len(SERVICE_ACCOUNT_PREFIX) :].partition(":")
    return (namespace, name) if namespace and name and ":" not in name else None


class TrustChecks:
    """The last answer of each federated source about this cluster's tokens, and how to ask again."""

    def __init__(
        self,
        local_client: ApiClient,
        *,
        service_account: str | None,
        trusted_seconds: float,
        untrusted_seconds: float,
        timeout: float,
        clock: Callable[[], float],
    ) -> None:
        self.local_client = local_client
        self._service_account = service_account  # "namespace/name", else found with a SelfSubjectReview
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

    def own_service_account(self) -> tuple[str, str] | str:
        """(namespace, name) of the controller's own service account, or why it has none."""
        if self._service_account:
            namespace, _, name = self._service_account.partition("/")
            return namespace, name
        try:
            username = str(kube.whoami(self.local_client, timeout=self.timeout).get("username") or "")
        except (ApiException, *kube.CONNECTION_ERRORS) as exc:
            return f"the local API server did not say who the controller is ({type(exc).__name__})"
        found = service_account_of(username)
        if found is None:
            return (
                f"the controller runs as {username!r}, not as a service account, so it has no token to check with; "
                "run it as its service account or pass --service-account NAMESPACE/NAME"
            )
        self._service_account = "/".join(found)
        return found

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
        own = self.own_service_account()
        if isinstance(own, str):
            answer = federation.TrustCheck(None, f"The controller cannot check cluster {source.cluster_name}: {own}")
        else:
            answer = self._ask(source, audience, own)
        seconds = self.trusted_seconds if answer.trusted else self.untrusted_seconds
        trust = Trust(source.cluster_name, audience, answer.username, answer.problem, now + seconds)
        with self._lock:
            self._answers[(source.cluster_name, audience)] = (_fingerprint(source, audience), trust)
        if answer.trusted:
            log.info("cluster %s trusts this cluster's tokens (audience %s)", source.cluster_name, audience)
        else:
            log.info("cluster %s does not trust this cluster's tokens yet: %s", source.cluster_name, answer.problem)
        return trust

    def _ask(self, source: FederatedSource, audience: str, own: tuple[str, str]) -> federation.TrustCheck:
        namespace, name = own
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
            return federation.TrustCheck(
                None,
                f"The controller could not get a token of its own service account {namespace}/{name} for audience "
                f"{audience} ({exc.status}: {' '.join(kube.error_message(exc).split())[:200]}); grant it create "
                "serviceaccounts/token on itself (manifests/controller)",
            )
        except (*kube.CONNECTION_ERRORS, tokens.TokenAnswerError) as exc:
            return federation.TrustCheck(
                None, f"The controller could not get a token from the local API server ({type(exc).__name__})"
            )
        answer = federation.check_trust(source, issued.token, timeout=self.timeout)
        if answer.trusted or answer.code != 401:
            return answer
        return federation.TrustCheck(
            None,
            f"Cluster {source.cluster_name} does not trust this cluster's service-account tokens (401 to a token of "
            f"{namespace}/{name} for audience {audience})",
            401,
        )
