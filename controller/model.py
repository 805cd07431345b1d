"""What the controller knows and decides, as data: the shared types of observe, assess, plan and act.

At the bottom of the controller: every other module may import it, it imports none of them. An `Observation` is
what one reconcile pass read from caches and memory; an assessment (`Blocked`, `NeedsToken`, `HasToken`,
`NeedsTrustCheck`, `Federated`) is what the import needs; `Writes` is what a pass writes and when it looks again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from controller.outputs.base import Observed, SourceView
from kubemcsa.contract import api
from kubemcsa.contract.federation import FederatedSource
from kubemcsa.contract.imports import (
    ImportToken,
    is_controlled_by,
    metadata_of,
)
from kubemcsa.contract.spec import ImportSpec


@dataclass(frozen=True)
class Remote:
    """Where a source cluster's API is and the CA that proves it (from the controller's own config for it)."""

    cluster_name: str
    server: str
    ca_pem: bytes = field(repr=False)
    origin: str = ""  # where the controller's credential for it comes from (to say how to renew it)
    credential_expires_at: float | None = None


@dataclass(frozen=True)
class ExportView:
    """What the source's export watch says of the service account an import names."""

    consumer: str | None  # this cluster's name in the source (its account there); None: unknown
    synced: bool  # False: the watch has not listed yet (or cannot: see `problem`)
    service_account: dict[str, Any] | None = None  # as the watch has it; None: not exported, or no such account
    exists: bool | None = None  # when the watch lacks it: whether it exists at all (None: unknown)
    problem: str | None = None  # why the watch cannot list, when it cannot: the import's message
    problem_reason: str = api.REASON_REMOTE_UNREACHABLE  # the condition reason for that

    @property
    def remote_uid(self) -> str | None:
        uid = metadata_of(self.service_account).get("uid")
        return uid if isinstance(uid, str) and uid else None


@dataclass(frozen=True)
class Observation:
    """Everything a reconcile pass knows about one import, read from caches and memory."""

    imp: dict[str, Any]
    secret: dict[str, Any] | None  # the Secret named after the import, as cached (or as last written)
    now: float
    source: Remote | None = None  # the import's source cluster, if the controller knows it
    known_clusters: tuple[str, ...] = ()
    cluster_error: str | None = None  # why the source's credentials are unusable, if they are
    held: ImportToken | None = None  # the token kept in memory for this import
    # Each output's object (controller/outputs), by output name, as cached (or as last written); and the
    # controller's own view of the source, which outputs describe.
    outputs: dict[str, Observed] = field(default_factory=dict)
    source_view: SourceView | None = None
    # tokenType Federated: the source as `kubemcsa federate` recorded it (or why its record is unusable), and the
    # last trust check for the import's source and audience.
    federated: FederatedSource | None = None
    federated_error: str | None = None
    known_federated: tuple[str, ...] = ()
    trust: Trust | None = None
    export: ExportView | None = None  # None with export_exempt False: unknown, so not allowed
    # The controller's own credential import (its own account in the source, in the system namespace): the
    # source's RBAC lets it rotate that token, and no owner exports it.
    export_exempt: bool = False
    # An import of the system namespace whose Secret is a source credential: the Secret counts as current only if
    # its writer pinned it in the import's status (kubemcsa.contract.imports.is_pinned); else it is rewritten from
    # memory.
    credential_unpinned: bool = False

    @property
    def own_secret(self) -> dict[str, Any] | None:
        """The Secret, if this import controls it."""
        if self.secret is not None and is_controlled_by(self.secret, metadata_of(self.imp).get("uid", "")):
            return self.secret
        return None


@dataclass(frozen=True)
class Blocked:
    """The import cannot get a token now.

    `source_failed`: the source failed to give one (it may pass): the last token stays in the Secret until it
    expires. `retry`: look again with this import's own backoff (otherwise its source's circuit wakes it).
    """

    reason: str
    message: str
    retry: bool = False
    spec: ImportSpec | None = None
    source_failed: bool = False
    withdraw: bool = False  # the source does not export it (any more): the token leaves the Secrets


@dataclass(frozen=True)
class NeedsToken:
    spec: ImportSpec
    source: Remote
    remote_uid: str | None = None  # of the exported service account, which the token is for
    refresh: bool = False  # the import holds a token still valid: its request goes before first tokens


@dataclass(frozen=True)
class HasToken:
    """A usable token: `current` if the Secret already holds it (then nothing is written but the status)."""

    spec: ImportSpec
    token: ImportToken
    current: bool = False


@dataclass(frozen=True)
class Trust:
    """What the source said when a token of this cluster was sent to its SelfSubjectReview, and until when
    that answer stands (a refusal is asked again sooner than an acceptance)."""

    cluster_name: str
    audience: str
    username: str | None  # as the source saw the trust-check identity's token; None: not trusted
    problem: str
    valid_until: float

    @property
    def trusted(self) -> bool:
        return self.username is not None


@dataclass(frozen=True)
class NeedsTrustCheck:
    """A federated import whose source's trust is unknown or due for a new look; `audience` is one the source's
    record allows (assess_federated refuses the others)."""

    spec: ImportSpec
    source: FederatedSource
    audience: str


@dataclass(frozen=True)
class Federated:
    """A federated import, its source known: the Secret holds connection details only; `trust` says whether the
    source accepts this cluster's tokens."""

    spec: ImportSpec
    source: FederatedSource
    trust: Trust


Assessment = Blocked | NeedsToken | HasToken | NeedsTrustCheck | Federated


# The controller's own credential for the source is refused: every import of that source says so, expired or not.
CREDENTIAL_REASONS = (api.REASON_UNAUTHORIZED, api.REASON_SOURCE_CREDENTIAL_EXPIRED)


@dataclass(frozen=True)
class SecretWrite:
    body: dict[str, Any]
    create: bool  # True: create it; False: replace the existing one


@dataclass(frozen=True)
class OutputWrite:
    """A write of an output's object (controller/outputs): create, replace, or delete (with preconditions)."""

    output: str  # the output's name
    body: dict[str, Any]  # to write; for a delete, the object as observed (its uid and resourceVersion)
    create: bool = False
    delete: bool = False


@dataclass
class Writes:
    """What a reconcile pass writes and when it looks again. Empty: nothing (the steady state)."""

    secrets: list[SecretWrite] = field(default_factory=list)
    outputs: list[OutputWrite] = field(default_factory=list)  # outputs' objects, after the import's Secret
    status: dict[str, Any] | None = None  # the new status, only if it differs from the current one
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_at: float | None = None
    retry: bool = False  # back off and look again
    failure_reason: str | None = None
    remember: ImportToken | None = None  # the token to keep in memory
    forget: bool = False  # drop the token kept in memory (its export was withdrawn)
    expires_at: float | None = None  # of the token the Secret holds after this pass, for the expiry metric
