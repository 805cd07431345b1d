"""The real Reconciler (controller/reconciler.py), one pass per row, over fakes of the controller's own interfaces.

Each row is the world before (the import, its Secret, whether the source is known and exports the account, what
the source answers to a token request, what the controller holds in memory, the time) and the calls the pass
makes: token requests, Secret and output writes, the status patch (its Ready reason), Events by reason, and when
the import is looked at again. As Open Cluster Management's managed-serviceaccount `TestReconcile` does, with
fakes of our own seams (Informer / kube.Resource, the source registry, the export view, the token source,
the trust checks, the Event recorder, the clock), never of the kubernetes client. The gates (rate limit and
circuit, controller/gates.py) are the real ones: they are pure, with the clock passed in.

A world that needs an import "as it stands" (`settled`) gets it from a first real pass at SETTLED that issued
tok-1; then the row's changes are applied and the pass under test runs. What these calls do on a real API server
is tested end to end in tests/test_controller_e2e.py.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from controller.gates import SourceGates
from controller.metrics import Metrics
from controller.model import ExportView, NeedsTrustCheck, Remote, Trust
from controller.outputs import OUTPUTS, argocd, clusterprofile
from controller.outputs.store import OutputCache
from controller.reconciler import Caches, Reconciler, import_key
from controller.remote import RemoteFailure, classify_remote_error, unreachable
from controller.runtime.manager import Result
from controller.source_clusters import ORIGIN_KUBECONFIG, SourceCluster
from kubemcsa.contract import api, imports
from kubemcsa.contract.credentials import Credentials
from kubemcsa.contract.federation import FederatedSource
from kubemcsa.contract.imports import ImportToken, IssuedToken, cache_form_of_secret, inputs_hash
from kubemcsa.contract.spec import ImportSpec, parse_spec
from kubemcsa.contract.timefmt import format_time
from kubemcsa_testing.patch import merge_patch

CA = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
CLUSTER, SERVER = "cluster2", "https://10.0.0.2:6443"
FEDERATED_CLUSTER, FEDERATED_SERVER = "fed2", "https://10.0.0.3:6443"
CONSUMER = "cluster1"  # this cluster's name in the source, which the owner exports to
NAMESPACE, NAME, KEY = "ns1", "imp", "ns1/imp"
SECRET = api.secret_name_for_import(NAME)
SETTLED = 1_800_000_000.0  # when the settled world's tok-1 was issued
LIFETIME = 3600.0  # of every token the fake source issues (as spec.expirationSeconds asks)
REFRESH_AFTER = 0.8 * LIFETIME  # a token is refreshed at 80 % of its lifetime
REFRESH = SETTLED + REFRESH_AFTER
EXPIRY = SETTLED + LIFETIME
TRUST_SECONDS = 600.0  # how long the fake trust check's answer stands
TOKEN_KEYS = frozenset(api.SECRET_KEYS)
FEDERATED_KEYS = frozenset(api.FEDERATED_SECRET_KEYS)
STRIPPED_KEYS = TOKEN_KEYS - {api.KEY_TOKEN, api.KEY_CONFIG}
EXPORTED_ACCOUNT = {
    "metadata": {
        "name": "pod-lister",
        "namespace": "default",
        "uid": "sa-uid-1",
        "labels": {api.EXPORTED_LABEL: api.EXPORTED_LABEL_VALUE},
        "annotations": {api.EXPORT_TO_ANNOTATION: f"{CONSUMER}/{NAMESPACE}"},
    }
}
FEDERATED_SOURCE = FederatedSource(
    cluster_name=FEDERATED_CLUSTER, server=FEDERATED_SERVER, ca_pem=CA, audience="fed2", user_prefix="cluster1:"
)


def _nobody() -> None:
    """The table drives every pass itself: the wake-ups the informers would give are not needed."""


def make_import(**spec: Any) -> dict[str, Any]:
    body = {"clusterName": CLUSTER, "namespace": "default", "name": "pod-lister", "expirationSeconds": 3600, **spec}
    body = {k: v for k, v in body.items() if v is not None}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "uid-imp", "generation": 1},
        "spec": body,
    }


SPEC = parse_spec(make_import())
FEDERATED_SPEC: dict[str, Any] = {"clusterName": FEDERATED_CLUSTER, "tokenType": "Federated", "name": None}


# --- fakes of the reconciler's collaborators ----------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    verb: str
    name: str
    body: Any


def conflict(reason: str) -> ApiException:
    return ApiException(status=409, reason=reason)


class FakeStore:
    """One resource type as our Informer (get, list, has_synced) and kube.Resource (create, replace,
    replace_status, patch_status, delete) see it. `server` is what the API server holds, `cache` what the informer
    shows (behind the server when a row says so); writes are recorded and answered as the API server answers
    them: 404 for what is not there, 409 AlreadyExists on create, 409 Conflict on a stale resourceVersion. What
    reaches the cache is delivered to the handlers, as an informer delivers it (run.py's handlers tell the
    reconciler, whose read-your-writes depend on it)."""

    has_synced = True
    last_error: int | None = None
    last_exception: BaseException | None = None

    def __init__(
        self, *, status_subresource: bool = True, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        self.status_subresource = status_subresource
        self.transform = transform  # as the controller's informer has it: what the cache holds of each object
        self.cache_behind = False  # True: writes reach the server only, as while an informer lags
        self.server: dict[tuple[str, str], dict[str, Any]] = {}
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.handlers: list[Callable[[str, dict[str, Any]], None]] = []
        self._version = 0

    def add_handler(self, handler: Callable[[str, dict[str, Any]], None]) -> None:
        self.handlers.append(handler)

    def _deliver(self, event: str, obj: dict[str, Any]) -> None:
        for handler in self.handlers:
            handler(event, copy.deepcopy(obj))

    def put(self, obj: dict[str, Any], *, cached: bool = True) -> dict[str, Any]:
        """Store `obj` on the server (and in the cache unless the informer has not seen it yet)."""
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = self._next_version()
        key = (meta.get("namespace") or "", meta["name"])
        self.server[key] = stored
        if cached and not self.cache_behind:
            event = "MODIFIED" if key in self.cache else "ADDED"
            self.cache[key] = self.cache_form(copy.deepcopy(stored))
            self._deliver(event, self.cache[key])
        return copy.deepcopy(stored)

    def cache_form(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.transform(obj) if self.transform is not None else obj

    def remove(self, name: str, namespace: str) -> None:
        obj = self.server.pop((namespace, name))
        self.cache.pop((namespace, name), None)
        self._deliver("DELETED", obj)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    # Informer
    def get(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        obj = self.cache.get((namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self) -> list[dict[str, Any]]:
        return [copy.deepcopy(obj) for obj in self.cache.values()]

    # kube.Resource
    def _existing(self, name: str, namespace: str | None, resource_version: Any = None) -> dict[str, Any]:
        obj = self.server.get((namespace or "", name))
        if obj is None:
            raise ApiException(status=404, reason="NotFound")
        if resource_version is not None and resource_version != obj["metadata"]["resourceVersion"]:
            raise conflict("Conflict")
        return obj

    def create(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        self.calls.append(Call("create", body["metadata"]["name"], copy.deepcopy(body)))
        if (namespace or "", body["metadata"]["name"]) in self.server:
            raise conflict("AlreadyExists")
        return self.put(self._without_status(body, None))

    def replace(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.calls.append(Call("replace", name, copy.deepcopy(body)))
        old = self._existing(name, namespace, body["metadata"].get("resourceVersion"))
        new = self._without_status(body, old)
        new["metadata"]["uid"] = old["metadata"]["uid"]
        return self.put(new)

    def replace_status(self, body: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        name = body["metadata"]["name"]
        self.calls.append(Call("replace_status", name, copy.deepcopy(body)))
        old = self._existing(name, namespace, body["metadata"].get("resourceVersion"))
        return self.put({**old, "status": copy.deepcopy(body.get("status"))})

    def patch_status(self, name: str, body: Any, namespace: str | None = None, patch_type: str = "merge") -> Any:
        self.calls.append(Call("patch_status", name, copy.deepcopy(body)))
        old = self._existing(name, namespace, (body.get("metadata") or {}).get("resourceVersion"))
        return self.put({**old, "status": merge_patch(old.get("status"), body.get("status"))})

    def delete(
        self,
        name: str,
        namespace: str | None = None,
        propagation_policy: str | None = None,
        preconditions: dict[str, str | None] | None = None,
    ) -> dict[str, Any]:
        self.calls.append(Call("delete", name, preconditions))
        old = self._existing(name, namespace, (preconditions or {}).get("resourceVersion"))
        if (preconditions or {}).get("uid") not in (None, old["metadata"]["uid"]):
            raise conflict("Conflict")
        self.remove(name, namespace or "")
        return {"kind": "Status", "status": "Success"}

    def _without_status(self, body: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """What a create or replace stores: with a status subresource, the status it sends is ignored."""
        stored = copy.deepcopy(body)
        if self.status_subresource:
            stored.pop("status", None)
            if old is not None and "status" in old:
                stored["status"] = copy.deepcopy(old["status"])
        return stored


class FakeClient:
    """What the source registry hands out for a cluster; the fakes below only pass it along."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster


class FakeSources:
    """The source registry (controller/sources.py): the source clusters the controller knows, by name."""

    def __init__(self) -> None:
        self.clusters: dict[str, SourceCluster] = {}
        self.errors: dict[str, str] = {}

    def get(self, name: str) -> SourceCluster | None:
        return self.clusters.get(name)

    def names(self) -> list[str]:
        return sorted(self.clusters)

    def error_for(self, name: str) -> str | None:
        return self.errors.get(name)

    def client(self, source: SourceCluster) -> Any:
        return FakeClient(source.name)


class FakeExports:
    """The export view (controller/export_watches.py): what the source's export watch says of the account."""

    warm_up_seconds = 10.0

    def __init__(self) -> None:
        self.answer: tuple[ExportView, bool] = (
            ExportView(CONSUMER, synced=True, service_account=EXPORTED_ACCOUNT),
            False,
        )
        self.exists: bool | None = True
        self.probes: list[tuple[str, str, str]] = []

    def view(
        self, remote: Remote, fingerprint: str, client: Any, consumer: str | None, namespace: str, name: str
    ) -> tuple[ExportView, bool]:
        return self.answer

    def probe_exists(self, source: str, namespace: str, name: str) -> bool | None:
        self.probes.append((source, namespace, name))
        return self.exists

    def unreachable(self, source: str) -> bool:
        return False


class FakeTokenSource:
    """The token source (controller/remote.py TokenSource): issues `answer` (a token's text, valid LIFETIME from
    now) or raises it (a RemoteFailure); records every request."""

    def __init__(self) -> None:
        self.answer: str | RemoteFailure | None = None
        self.requests: list[tuple[str, str, str, str | None]] = []

    def __call__(
        self,
        client: Any,
        source: Remote,
        spec: ImportSpec,
        *,
        timeout: float,
        clock: Any,
        remote_uid: str | None = None,
    ) -> ImportToken:
        assert client.cluster == source.cluster_name  # the client of the import's own source
        self.requests.append((source.cluster_name, spec.namespace, spec.name, remote_uid))
        if isinstance(self.answer, RemoteFailure):
            raise self.answer
        assert self.answer is not None, "a token request the row does not expect"
        issued = IssuedToken(self.answer, clock(), clock() + LIFETIME)
        creds = Credentials(server=source.server, ca_crt=source.ca_pem, token=issued.token, namespace=spec.namespace)
        return ImportToken(creds, issued, inputs_hash(spec, source.server, source.ca_pem, remote_uid))


class FakeFederatedSources:
    """The federated sources recorded in the system namespace (controller/trust_checks.py FederatedSources)."""

    def __init__(self) -> None:
        self.sources = {FEDERATED_CLUSTER: FEDERATED_SOURCE}

    def get(self, cluster_name: str) -> tuple[FederatedSource | None, str | None]:
        return self.sources.get(cluster_name), None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.sources))


class FakeTrustChecks:
    """The trust checks (controller/trust_checks.py TrustChecks): the source trusts this cluster's tokens or not."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.trusted = True
        self.checks: list[tuple[str, str]] = []
        self._answers: dict[tuple[str, str], Trust] = {}

    def cached(self, source: FederatedSource, audience: str) -> Trust | None:
        return self._answers.get((source.cluster_name, audience))

    def check(self, need: NeedsTrustCheck) -> Trust:
        self.checks.append((need.source.cluster_name, need.audience))
        username = f"cluster1:system:serviceaccount:{NAMESPACE}:trust-check" if self.trusted else None
        problem = "" if self.trusted else f"Cluster {FEDERATED_CLUSTER} rejected this cluster's token (401)"
        trust = Trust(need.source.cluster_name, need.audience, username, problem, self.clock() + TRUST_SECONDS)
        self._answers[(need.source.cluster_name, need.audience)] = trust
        return trust


class FakeRecorder:
    """The Event recorder (controller/runtime/events.py): keeps (type, reason, message) of each Event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def record(self, obj: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        assert obj["metadata"]["name"] == NAME
        self.events.append((event_type, reason, message))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- a row: the world before, and the calls expected -----------------------------------------------------------
EXPORTED, NOT_EXPORTED, NO_ACCOUNT, WARMING = "exported", "not exported", "no such account", "warming"
FOREIGN, UNSEEN, EDITED = "foreign", "unseen", "edited"
PRESENT, DELETING, GONE = "present", "deleting", "gone"


@dataclass(frozen=True)
class World:
    spec: dict[str, Any] = field(default_factory=dict)  # the import's spec fields over make_import's
    settled: bool = False  # the import and its Secret as a first pass at SETTLED left them (tok-1)
    held: bool = True  # the controller still holds that token in memory (False: it restarted since)
    edit: dict[str, Any] = field(default_factory=dict)  # spec fields changed after it settled (a new generation)
    failed_at: float | None = None  # an earlier pass got the same answer then (the failure goes on)
    now: float = SETTLED
    answer: str | RemoteFailure | None = None  # the token source's answer; None: no request expected
    source: bool = True  # the controller knows the import's source cluster
    cluster_error: str | None = None  # why it cannot use that cluster's credentials
    export: str = EXPORTED  # what the source's export watch says of the account
    secret: str | None = None  # FOREIGN (cached), UNSEEN (on the server, not yet cached), EDITED (cache behind)
    circuit_open: bool = False  # another import's request found the source down
    trusted: bool = True  # a federated source's answer to the trust check
    import_state: str = PRESENT
    leader: bool = True


@dataclass(frozen=True)
class Expect:
    token_requests: int = 0
    secrets: tuple[tuple[str, frozenset[str]], ...] = ()  # (verb, data keys) of each write of the import's Secret
    secret_token: str | None = None  # the token the import's Secret holds after the pass (None: no token there)
    ready: str | None = None  # the Ready reason the status patch sets (None: no status patch)
    events: tuple[str, ...] = ()  # Event reasons, in order
    requeue_after: float | None = None
    retry: bool = False
    outcome: str = "success"
    trust_checks: int = 0
    outputs: tuple[tuple[str, str], ...] = ()  # (output, verb) of each write of an output's object
    condition: tuple[str, str] | None = None  # (type, reason) of an output's condition in the status patch
    circuit_open: bool = False  # the source's circuit is open after the pass
    export_probes: int = 0  # list calls that tell a withdrawn export from a deleted account
    says: str = ""  # words the Ready message holds


@dataclass(frozen=True)
class Case:
    name: str
    world: World
    expect: Expect


def source_down() -> RemoteFailure:
    return unreachable(Remote(CLUSTER, SERVER, CA), ConnectionRefusedError(111, "Connection refused"))


def answered(code: int, message: str = "denied") -> RemoteFailure:
    return classify_remote_error(code, message, CLUSTER, SPEC)


SUBJECT_MISMATCH = RemoteFailure(
    api.REASON_TOKEN_SUBJECT_MISMATCH,
    f"Cluster {CLUSTER} answered a token of service account default/other when asked for one of service account "
    "default/pod-lister, so it is not used; check what answers at its address.",
)

ARGOCD = argocd.OUTPUT.name
CLUSTERPROFILE = clusterprofile.OUTPUT.name

CASES = [
    # --- tokens ---
    Case(
        "first token: one request, the Secret created with its five keys, Ready TokenIssued, no Event",
        World(answer="tok-1"),
        Expect(1, (("create", TOKEN_KEYS),), "tok-1", api.REASON_TOKEN_ISSUED, requeue_after=REFRESH_AFTER),
    ),
    Case(
        "steady state: no call at all, back at 80 %",
        World(settled=True, now=SETTLED + 10),
        Expect(secret_token="tok-1", requeue_after=REFRESH_AFTER - 10),
    ),
    Case(
        "after a restart the Secret alone is enough: no call",
        World(settled=True, held=False, now=SETTLED + 10),
        Expect(secret_token="tok-1", requeue_after=REFRESH_AFTER - 10),
    ),
    Case(
        "refresh not due yet at 79.9 %: no call",
        World(settled=True, now=REFRESH - 1),
        Expect(secret_token="tok-1", requeue_after=1),
    ),
    Case(
        "refresh at 80 %: one request, the Secret replaced, TokenRefreshed",
        World(settled=True, now=REFRESH, answer="tok-2"),
        Expect(
            1,
            (("replace", TOKEN_KEYS),),
            "tok-2",
            api.REASON_TOKEN_ISSUED,
            ("TokenRefreshed",),
            requeue_after=REFRESH_AFTER,
        ),
    ),
    Case(
        "a spec change (audiences) needs a new token at once",
        World(settled=True, now=SETTLED + 10, edit={"audiences": ["vault"]}, answer="tok-2"),
        Expect(
            1,
            (("replace", TOKEN_KEYS),),
            "tok-2",
            api.REASON_TOKEN_ISSUED,
            ("TokenRefreshed",),
            requeue_after=REFRESH_AFTER,
        ),
    ),
    Case(
        "refresh fails (source down): the last good Secret kept, RemoteUnreachable, back at expiry, circuit open",
        World(settled=True, now=REFRESH + 20, answer=source_down()),
        Expect(
            1,
            (),
            "tok-1",
            api.REASON_REMOTE_UNREACHABLE,
            (api.REASON_REMOTE_UNREACHABLE,),
            requeue_after=EXPIRY - REFRESH - 20,
            circuit_open=True,
            says="The last token stays in Secret imp-token until it expires",
        ),
    ),
    Case(
        "refresh refused (403): the last good Secret kept, Forbidden, retried with backoff until expiry",
        World(settled=True, now=REFRESH + 20, answer=answered(403)),
        Expect(
            1,
            (),
            "tok-1",
            api.REASON_FORBIDDEN,
            (api.REASON_FORBIDDEN,),
            requeue_after=EXPIRY - REFRESH - 20,
            retry=True,
            outcome="error",
        ),
    ),
    Case(
        "refresh refused again: asked again with backoff, the reason kept, nothing written, no second Event",
        World(settled=True, failed_at=REFRESH + 20, now=REFRESH + 40, answer=answered(403)),
        Expect(1, (), "tok-1", requeue_after=EXPIRY - REFRESH - 40, retry=True, outcome="error"),
    ),
    Case(
        "source still down at the next look: no request while its circuit is open, nothing new written",
        World(settled=True, failed_at=REFRESH + 20, now=REFRESH + 40, answer=source_down()),
        Expect(0, (), "tok-1", requeue_after=EXPIRY - REFRESH - 40, circuit_open=True),
    ),
    Case(
        "expired after failures (its circuit still open): no request, the Secret left alone, TokenExpired",
        World(settled=True, failed_at=REFRESH + 20, now=EXPIRY + 1, answer=source_down()),
        Expect(0, (), "tok-1", api.REASON_TOKEN_EXPIRED, (api.REASON_TOKEN_EXPIRED,), circuit_open=True),
    ),
    Case(
        "expired, the source refusing (403) all along: asked again, TokenExpired saying why",
        World(settled=True, failed_at=REFRESH + 20, now=EXPIRY + 1, answer=answered(403)),
        Expect(
            1,
            (),
            "tok-1",
            api.REASON_TOKEN_EXPIRED,
            (api.REASON_TOKEN_EXPIRED,),
            retry=True,
            outcome="error",
            says="could not be refreshed: Cluster cluster2 refused",
        ),
    ),
    # --- what the source answers to a first request ---
    Case(
        "403 from the source: Forbidden, no Secret, retried with backoff",
        World(answer=answered(403)),
        Expect(1, (), None, api.REASON_FORBIDDEN, (api.REASON_FORBIDDEN,), retry=True, outcome="error"),
    ),
    Case(
        "404 from the source: RemoteServiceAccountNotFound",
        World(answer=answered(404)),
        Expect(
            1,
            (),
            None,
            api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,
            (api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,),
            retry=True,
            outcome="error",
        ),
    ),
    Case(
        "unreachable source: RemoteUnreachable, its circuit opens (source_failed: no per-import retry)",
        World(answer=source_down()),
        Expect(1, (), None, api.REASON_REMOTE_UNREACHABLE, (api.REASON_REMOTE_UNREACHABLE,), circuit_open=True),
    ),
    Case(
        "the source's circuit is open already: no request, Ready says why",
        World(circuit_open=True),
        Expect(0, (), None, api.REASON_REMOTE_UNREACHABLE, (api.REASON_REMOTE_UNREACHABLE,), circuit_open=True),
    ),
    Case(
        "a token whose subject is another account: TokenSubjectMismatch, not written",
        World(answer=SUBJECT_MISMATCH),
        Expect(
            1,
            (),
            None,
            api.REASON_TOKEN_SUBJECT_MISMATCH,
            (api.REASON_TOKEN_SUBJECT_MISMATCH,),
            retry=True,
            outcome="error",
        ),
    ),
    # --- blocked before any request ---
    Case(
        "unknown cluster: no request, UnknownCluster",
        World(source=False),
        Expect(0, (), None, api.REASON_UNKNOWN_CLUSTER, (api.REASON_UNKNOWN_CLUSTER,)),
    ),
    Case(
        "a cluster whose credentials are unusable: UnknownCluster saying why",
        World(source=False, cluster_error="the mounted import has no file 'token'."),
        Expect(0, (), None, api.REASON_UNKNOWN_CLUSTER, (api.REASON_UNKNOWN_CLUSTER,)),
    ),
    Case(
        "invalid spec: no request, InvalidSpec",
        World(spec={"expirationSeconds": 5}),
        Expect(0, (), None, api.REASON_INVALID_SPEC, (api.REASON_INVALID_SPEC,)),
    ),
    Case(
        "Secret name conflict (a foreign Secret cached): no request, no write, SecretNameConflict",
        World(secret=FOREIGN),
        Expect(0, (), None, api.REASON_SECRET_CONFLICT, (api.REASON_SECRET_CONFLICT,)),
    ),
    Case(
        "not exported: no request, NotExported, one probe tells it from a deleted account",
        World(export=NOT_EXPORTED),
        Expect(0, (), None, api.REASON_NOT_EXPORTED, (api.REASON_NOT_EXPORTED,), export_probes=1),
    ),
    Case(
        "export withdrawn: the token stripped from the Secret, NotExported",
        World(settled=True, now=SETTLED + 10, export=NOT_EXPORTED),
        Expect(
            0,
            (("replace", STRIPPED_KEYS),),
            None,
            api.REASON_NOT_EXPORTED,
            (api.REASON_NOT_EXPORTED,),
            export_probes=1,
        ),
    ),
    Case(
        "the remote account does not exist: no request, RemoteServiceAccountNotFound",
        World(export=NO_ACCOUNT),
        Expect(
            0,
            (),
            None,
            api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,
            (api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND,),
            export_probes=1,
        ),
    ),
    Case(
        "the source's exports are still listing: no call, back once they are",
        World(export=WARMING),
        Expect(requeue_after=FakeExports.warm_up_seconds, outcome="skipped"),
    ),
    # --- the caches behind the API server ---
    Case(
        "create answered 409 AlreadyExists (the cache has not seen that Secret): no status, retry",
        World(secret=UNSEEN, answer="tok-1"),
        Expect(1, (("create", TOKEN_KEYS),), None, retry=True, outcome="conflict"),
    ),
    Case(
        "replace answered 409 Conflict (the Secret was edited since cached): no status, retry",
        World(settled=True, now=REFRESH, secret=EDITED, answer="tok-2"),
        Expect(1, (("replace", TOKEN_KEYS),), "tok-1", retry=True, outcome="conflict"),
    ),
    # --- the import itself, and the lease ---
    Case(
        "the import is being deleted: no call",
        World(settled=True, now=REFRESH, import_state=DELETING),
        Expect(secret_token="tok-1", outcome="skipped"),
    ),
    Case(
        "the import is gone: no call",
        World(import_state=GONE),
        Expect(outcome="skipped"),
    ),
    Case(
        "not the leader, a token due: no call",
        World(settled=True, now=REFRESH, leader=False),
        Expect(secret_token="tok-1", outcome="skipped"),
    ),
    Case(
        "not the leader, blocked: not even the status or an Event",
        World(source=False, leader=False),
        Expect(outcome="skipped"),
    ),
    # --- federated imports: no token is copied, the source's trust is checked instead ---
    Case(
        "federated, trusted: one trust check, the Secret without token, Ready Federated",
        World(spec=FEDERATED_SPEC),
        Expect(
            0,
            (("create", FEDERATED_KEYS),),
            None,
            api.REASON_FEDERATED,
            requeue_after=TRUST_SECONDS,
            trust_checks=1,
        ),
    ),
    Case(
        "federated, not trusted: the Secret all the same, FederationNotTrusted",
        World(spec=FEDERATED_SPEC, trusted=False),
        Expect(
            0,
            (("create", FEDERATED_KEYS),),
            None,
            api.REASON_FEDERATION_NOT_TRUSTED,
            (api.REASON_FEDERATION_NOT_TRUSTED,),
            requeue_after=TRUST_SECONDS,
            trust_checks=1,
        ),
    ),
    Case(
        "federated, steady state: the last answer stands, no call",
        World(spec=FEDERATED_SPEC, settled=True, now=SETTLED + 10),
        Expect(requeue_after=TRUST_SECONDS - 10),
    ),
    Case(
        "federated, audience not allowed by the source's record: no trust check, AudienceNotAllowed",
        World(spec={**FEDERATED_SPEC, "audiences": ["vault"]}),
        Expect(0, (), None, api.REASON_AUDIENCE_NOT_ALLOWED, (api.REASON_AUDIENCE_NOT_ALLOWED,)),
    ),
    # --- outputs (controller/outputs/) ---
    Case(
        "Argo CD output: the import's Secret, then its Argo CD cluster Secret",
        World(spec={"argoCD": {"name": "prod"}}, answer="tok-1"),
        Expect(
            1,
            (("create", TOKEN_KEYS),),
            "tok-1",
            api.REASON_TOKEN_ISSUED,
            requeue_after=REFRESH_AFTER,
            outputs=((ARGOCD, "create"),),
            condition=(argocd.CONDITION_ARGOCD, argocd.REASON_WRITTEN),
        ),
    ),
    Case(
        "ClusterProfile output: created, then its status written on the status subresource",
        World(spec={"clusterProfile": {}}, answer="tok-1"),
        Expect(
            1,
            (("create", TOKEN_KEYS),),
            "tok-1",
            api.REASON_TOKEN_ISSUED,
            requeue_after=REFRESH_AFTER,
            outputs=((CLUSTERPROFILE, "create"), (CLUSTERPROFILE, "replace_status")),
            condition=(clusterprofile.CONDITION_CLUSTER_PROFILE, clusterprofile.REASON_WRITTEN),
        ),
    ),
]


# --- running a row -----------------------------------------------------------------------------------------------
class Harness:
    """A real Reconciler over the fakes; `restart` builds another over the same stores (nothing in memory)."""

    def __init__(self, now: float) -> None:
        self.clock = Clock(now)
        self.imports = FakeStore()
        self.secrets = FakeStore(  # its cache holds import Secrets as the controller's does (run.py)
            status_subresource=False, transform=lambda secret: cache_form_of_secret(secret, api.SYSTEM_NAMESPACE)
        )
        self.outputs = {o.name: FakeStore(status_subresource=o.owns.status_subresource) for o in OUTPUTS}
        self.sources = FakeSources()
        self.sources.clusters[CLUSTER] = SourceCluster(
            CLUSTER, ORIGIN_KUBECONFIG, SERVER, CA, "fingerprint-1", build=FakeClient, consumer=CONSUMER
        )
        self.exports = FakeExports()
        self.tokens = FakeTokenSource()
        self.federated = FakeFederatedSources()
        self.trust = FakeTrustChecks(self.clock)
        self.recorder = FakeRecorder()
        self.gates = SourceGates(clock=self.clock)
        self.woken: list[str] = []
        self.leader = True
        self.reconciler = self.restart()
        # The informers' events, as controller/run.py hands them to the reconciler.
        self.imports.add_handler(self._import_event)
        self.secrets.add_handler(lambda event, obj: self.reconciler.secret_seen(obj, _nobody, event == "DELETED"))
        for name, store in self.outputs.items():
            store.add_handler(
                lambda event, obj, name=name: self.reconciler.output_seen(name, obj, _nobody, event == "DELETED")
            )

    def _import_event(self, event: str, obj: dict[str, Any]) -> None:
        if event == "DELETED":
            self.reconciler.import_deleted(import_key(NAMESPACE, obj["metadata"]["name"]))
        else:
            self.reconciler.import_seen(obj, _nobody)

    def restart(self) -> Reconciler:
        # The fakes stand for Informer and kube.Resource (one store is both, as an informer and its resource).
        caches = Caches(
            self.imports,
            self.secrets,
            self.imports,
            self.secrets,
            outputs={name: OutputCache(store, store) for name, store in self.outputs.items()},
        )
        self.reconciler = Reconciler(
            caches,
            self.sources,
            self.recorder,
            Metrics(),
            gates=self.gates,
            wake=self.woken.extend,
            may_write=lambda: self.leader,
            remote_timeout=5.0,
            exports=self.exports,
            clock=self.clock,
            federated=self.federated,
            trust_checks=self.trust,
            token_source=self.tokens,
        )
        return self.reconciler

    def reconcile(self) -> Result:
        return self.reconciler.reconcile(KEY)

    def forget_calls(self) -> None:
        for store in (self.imports, self.secrets, *self.outputs.values()):
            store.calls.clear()
        self.tokens.requests.clear()
        self.trust.checks.clear()
        self.exports.probes.clear()
        self.recorder.events.clear()


def prepare(world: World) -> Harness:
    """The world before the pass under test, built with the real reconciler where it needs a history."""
    h = Harness(SETTLED)
    h.imports.put(make_import(**world.spec))
    if world.settled:
        h.tokens.answer = "tok-1"
        h.trust.trusted = world.trusted
        first = h.reconcile()
        assert not first.retry and h.secrets.calls, "the settled world could not be built"
        h.forget_calls()
        if not world.held:
            h.restart()
    h.clock.now = world.now
    h.tokens.answer = world.answer
    h.trust.trusted = world.trusted
    if world.edit:
        imp = h.imports.get(NAME, NAMESPACE)
        assert imp is not None
        imp["spec"].update(world.edit)
        imp["metadata"]["generation"] += 1
        h.imports.put(imp)
    if not world.source:
        del h.sources.clusters[CLUSTER]
        if world.cluster_error:
            h.sources.errors[CLUSTER] = world.cluster_error
    if world.export == NOT_EXPORTED:
        h.exports.answer = (ExportView(CONSUMER, synced=True, service_account=None), False)
        h.exports.exists = True
    elif world.export == NO_ACCOUNT:
        h.exports.answer = (ExportView(CONSUMER, synced=True, service_account=None), False)
        h.exports.exists = False
    elif world.export == WARMING:
        h.exports.answer = (ExportView(CONSUMER, synced=False), True)
    foreign = {"metadata": {"name": SECRET, "namespace": NAMESPACE}, "data": {"x": "eQ=="}}
    if world.secret == FOREIGN:
        h.secrets.put(foreign)
    elif world.secret == UNSEEN:
        h.secrets.put(foreign, cached=False)
    elif world.secret == EDITED:  # someone added a key on the server; the informer has not delivered it yet
        stored = h.secrets.server[(NAMESPACE, SECRET)]
        h.secrets.put({**stored, "data": {**stored["data"], "x": "eQ=="}}, cached=False)
    if world.circuit_open:
        failure = source_down()
        h.gates.gate(CLUSTER).failed("other/import", h.clock(), failure.reason, failure.message)
    if world.import_state == DELETING:
        imp = h.imports.get(NAME, NAMESPACE)
        assert imp is not None
        imp["metadata"]["deletionTimestamp"] = format_time(world.now)
        h.imports.put(imp)
    elif world.import_state == GONE:
        h.imports.remove(NAME, NAMESPACE)
    if world.failed_at is not None:
        h.clock.now = world.failed_at
        assert h.reconcile().outcome != "skipped" and h.tokens.requests, "the earlier failure could not be built"
        h.forget_calls()
        h.clock.now = world.now
    h.leader = world.leader
    return h


def secret_token(store: FakeStore) -> str | None:
    secret = store.server.get((NAMESPACE, SECRET))
    value = (secret or {}).get("data", {}).get(api.KEY_TOKEN)
    return base64.b64decode(value).decode() if value else None


def ready_of(patch: dict[str, Any]) -> dict[str, Any]:
    (ready,) = [c for c in patch["status"]["conditions"] if c["type"] == api.CONDITION_READY]
    return ready


def conditions(patch: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["reason"] for c in (patch["status"].get("conditions") or [])}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reconcile(case: Case) -> None:
    h = prepare(case.world)
    result = h.reconcile()
    expect = case.expect

    assert len(h.tokens.requests) == expect.token_requests
    assert all(r[:3] == (CLUSTER, "default", "pod-lister") for r in h.tokens.requests)
    assert len(h.trust.checks) == expect.trust_checks
    assert len(h.exports.probes) == expect.export_probes

    secret_writes = [(c.verb, frozenset(c.body.get("data") or {})) for c in h.secrets.calls]
    assert secret_writes == list(expect.secrets)
    assert all(c.name == SECRET for c in h.secrets.calls)
    assert secret_token(h.secrets) == expect.secret_token

    output_writes = [(name, c.verb) for name, store in h.outputs.items() for c in store.calls]
    assert output_writes == list(expect.outputs)

    patches = [c for c in h.imports.calls if c.verb == "patch_status"]
    assert [c.verb for c in h.imports.calls] == ["patch_status"] * len(patches)  # the import: its status only
    if expect.ready is None:
        assert patches == []
    else:
        (patch,) = patches
        assert conditions(patch.body)[api.CONDITION_READY] == expect.ready
        assert expect.says in ready_of(patch.body)["message"]
        if expect.condition is not None:
            kind, reason = expect.condition
            assert conditions(patch.body)[kind] == reason

    assert [reason for _, reason, _ in h.recorder.events] == list(expect.events)

    assert result.retry == expect.retry
    assert result.outcome == expect.outcome
    if expect.requeue_after is None:
        assert result.requeue_after is None
    else:
        assert result.requeue_after == pytest.approx(expect.requeue_after)
    assert h.gates.gate(CLUSTER).is_open == expect.circuit_open

    # Tokens never reach a status, an Event or a message (only the Secrets hold them).
    said = repr([c.body for c in h.imports.calls]) + repr(h.recorder.events)
    assert "tok-" not in said


def test_the_table_covers_what_the_brief_lists() -> None:
    """At least 15 rows, with names that say one case each."""
    names = [c.name for c in CASES]
    assert len(names) >= 15 and len(set(names)) == len(names)


def test_what_the_reconciler_remembers_of_its_own_secret_write_is_what_the_cache_would_hold() -> None:
    """While the Secret informer lags (a flood), each write is remembered until it is seen: in the cache's form,
    without its kubeconfig, or the memory of thousands of writes would hold a whole Secret each."""
    h = prepare(World())
    h.secrets.cache_behind = True
    h.tokens.answer = "tok-1"
    h.reconcile()
    remembered = h.reconciler.secret_writes.get((NAMESPACE, SECRET), None)
    assert remembered is not None and remembered["data"][api.KEY_CONFIG] == ""
    assert remembered[imports.CACHED_TOKEN] == "tok-1" and secret_token(h.secrets) == "tok-1"
    # One copy of the token: the write remembered holds the very string the memory of the token holds (10,000
    # imports held two copies of every token, 9 MB, before it did).
    assert remembered[imports.CACHED_TOKEN] is h.reconciler._held[KEY].credentials.token
    h.forget_calls()
    h.clock.now += 5
    h.restart()  # nothing held in memory but that write: the remembered Secret alone is current
    h.reconciler.secret_writes.wrote((NAMESPACE, SECRET), remembered)
    result = h.reconcile()
    assert not h.tokens.requests and not h.secrets.calls and not h.imports.calls and not result.retry


def test_a_withdrawn_export_forgets_the_held_token() -> None:
    """Withdrawn, then exported again: the stripped Secret is not refilled from memory, a new token is asked."""
    h = prepare(World(settled=True, now=SETTLED + 10, export=NOT_EXPORTED))
    h.reconcile()
    h.forget_calls()
    h.exports.answer = (ExportView(CONSUMER, synced=True, service_account=EXPORTED_ACCOUNT), False)
    h.tokens.answer = "tok-2"
    h.clock.now += 5
    result = h.reconcile()
    assert len(h.tokens.requests) == 1 and secret_token(h.secrets) == "tok-2"
    assert [c.verb for c in h.secrets.calls] == ["replace"] and not result.retry


def test_a_failed_refresh_then_recovery_turns_ready_again() -> None:
    """The source down at 80 %, back before expiry: the next pass refreshes, Ready True again with a new
    lastTransitionTime (Ready had turned False)."""
    h = prepare(World(settled=True, now=REFRESH + 20, answer=source_down()))
    h.reconcile()
    h.forget_calls()
    h.gates.reset(CLUSTER)  # its probe answered: the circuit closes
    h.clock.now = REFRESH + 60
    h.tokens.answer = "tok-2"
    result = h.reconcile()
    (patch,) = [c.body for c in h.imports.calls]
    ready = ready_of(patch)
    assert (ready["status"], ready["reason"]) == ("True", api.REASON_TOKEN_ISSUED)
    assert ready["lastTransitionTime"] == format_time(REFRESH + 60)
    assert secret_token(h.secrets) == "tok-2" and result.requeue_after == pytest.approx(REFRESH_AFTER)


def test_after_a_refused_first_token_the_next_one_turns_ready() -> None:
    """404 first (Ready False), then the account exists: Ready True, its lastTransitionTime now."""
    h = prepare(World(answer=answered(404)))
    h.reconcile()
    h.forget_calls()
    h.clock.now = SETTLED + 5
    h.tokens.answer = "tok-1"
    h.reconcile()
    (patch,) = [c.body for c in h.imports.calls]
    ready = ready_of(patch)
    assert (ready["status"], ready["reason"]) == ("True", api.REASON_TOKEN_ISSUED)
    assert ready["lastTransitionTime"] == format_time(SETTLED + 5)
    assert [c.verb for c in h.secrets.calls] == ["create"] and secret_token(h.secrets) == "tok-1"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (None, api.REASON_REMOTE_UNREACHABLE),
        (401, api.REASON_UNAUTHORIZED),
        (403, api.REASON_FORBIDDEN),
        (404, api.REASON_REMOTE_SERVICE_ACCOUNT_NOT_FOUND),
        (422, api.REASON_INVALID_SPEC),
        (500, api.REASON_REMOTE_UNREACHABLE),
        (503, api.REASON_REMOTE_UNREACHABLE),
        (418, api.REASON_REMOTE_ERROR),
    ],
)
def test_a_source_answer_sets_its_reason(code: int | None, reason: str) -> None:
    """Each answer of the source (classified by controller/remote.py) as the reconciler acts on it: Ready False
    with its reason and no Secret; the source's own failures open its circuit, the import's back off alone."""
    failure = classify_remote_error(code, "boom", CLUSTER, SPEC)
    assert failure.reason == reason
    assert failure.source_down == (code is None or code == 401 or code >= 500)
    h = prepare(World(answer=failure))
    result = h.reconcile()
    (patch,) = [c.body for c in h.imports.calls]
    assert (ready_of(patch)["status"], ready_of(patch)["reason"]) == ("False", reason)
    assert h.secrets.calls == [] and [r for _, r, _ in h.recorder.events] == [reason]
    assert h.gates.gate(CLUSTER).is_open == failure.source_down
    assert result.retry != failure.source_down
