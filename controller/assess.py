"""What one ServiceAccountImport needs, decided from data alone (no API call, no clock, no I/O).

A reconcile pass (controller/reconciler.py) observes the caches into an `Observation`, calls `assess` once,
acts on the answer (a token request only for `NeedsToken`), then calls `plan` with what it has in the end: a
`HasToken` or a `Blocked`. `plan` says what to write. Neither runs twice.

To add a reason an import is blocked (say, the source does not export the service account), add a check to
`CHECKS`: a function of the Observation and the spec that returns a `Blocked`, or None to let the import on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.outputs import OUTPUTS
from controller.outputs.base import REASON_CACHE_NOT_SYNCED, Observed, Output, SourceView, as_section, plan_output
from kubemcsa.contract import api
from kubemcsa.contract.export_policy import export_verdict
from kubemcsa.contract.federation import REMOTE_USER_PLACEHOLDER, FederatedSource, audience_refusal
from kubemcsa.contract.imports import (
    STATUS_PINS,
    ImportToken,
    as_dict,
    as_list,
    federated_import_secret,
    federated_secret_is_current,
    import_secret,
    inputs_hash,
    is_controlled_by,
    metadata_of,
    secret_is_current,
    token_from_secret,
    token_times,
    without_token,
)
from kubemcsa.contract.spec import ImportSpec, SpecError, parse_spec
from kubemcsa.contract.timefmt import format_time


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


# --- assessments -------------------------------------------------------------------------------------------------


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
Check = Callable[[Observation, ImportSpec], Blocked | None]


def check_secret_conflict(obs: Observation, spec: ImportSpec) -> Blocked | None:
    if obs.secret is None or obs.own_secret is not None:
        return None
    meta = metadata_of(obs.imp)
    name = api.secret_name_for_import(meta.get("name", ""))
    return Blocked(
        api.REASON_SECRET_CONFLICT,
        f"A Secret named {name} already exists in namespace {meta.get('namespace')} and is not controlled "
        "by this import; delete or rename that Secret, or rename the import.",
        spec=spec,
    )


def check_source_known(obs: Observation, spec: ImportSpec) -> Blocked | None:
    if obs.source is not None:
        return None
    if obs.cluster_error:
        message = f"The controller cannot use the credentials of cluster {spec.cluster_name}: {obs.cluster_error}"
    else:
        known = ", ".join(sorted(obs.known_clusters)) or "none"
        message = (
            f"The controller knows no cluster named {spec.cluster_name} (known: {known}); fix spec.clusterName "
            "or give the controller credentials for it (--source-kubeconfig context, mounted import, "
            "kubemcsa bootstrap)."
        )
    return Blocked(api.REASON_UNKNOWN_CLUSTER, message, spec=spec)


def check_exported(obs: Observation, spec: ImportSpec) -> Blocked | None:
    """The source's owner must export the service account to this cluster and the import's namespace."""
    if obs.export_exempt:
        return None
    view = obs.export
    if view is None or not view.synced:
        return Blocked(
            view.problem_reason if view is not None else api.REASON_REMOTE_UNREACHABLE,
            (view.problem if view is not None else None)
            or f"The controller cannot see yet which service accounts cluster {spec.cluster_name} exports; it "
            "retries by itself.",
            retry=True,
            spec=spec,
            source_failed=True,
        )
    verdict = export_verdict(
        view.service_account,
        exists=view.exists,
        source=spec.cluster_name,
        namespace=spec.namespace,
        name=spec.name,
        consumer=view.consumer,
        import_namespace=str(metadata_of(obs.imp).get("namespace", "")),
    )
    if verdict.allowed:
        return None
    # Without its own name the controller cannot tell a withdrawal from its own misconfiguration: the Secret keeps
    # what it holds until it expires (a `*` cluster pattern matched above whatever the name).
    return Blocked(verdict.reason, verdict.message, spec=spec, withdraw=view.consumer is not None)


# In order: the first that blocks wins.
CHECKS: list[Check] = [check_secret_conflict, check_source_known, check_exported]


def assess(obs: Observation) -> Assessment:
    """Whether the import's Secret is current, needs a token from the source, or is blocked (and why)."""
    try:
        spec = parse_spec(obs.imp)
        for output in OUTPUTS:  # each output parses its own section: an invalid one is an invalid spec
            output.parse(spec, as_section(obs.imp, output.spec_field))
    except SpecError as exc:
        return Blocked(api.REASON_INVALID_SPEC, str(exc))
    if spec.federated:
        return assess_federated(obs, spec)
    for check in CHECKS:
        blocked = check(obs, spec)
        if blocked is not None:
            return blocked
    assert obs.source is not None  # check_source_known
    remote_uid = None if obs.export_exempt or obs.export is None else obs.export.remote_uid
    wanted = inputs_hash(spec, obs.source.server, obs.source.ca_pem, remote_uid)
    ours = obs.own_secret
    if ours is not None and not obs.credential_unpinned and secret_is_current(ours, wanted, obs.now):
        recovered = token_from_secret(ours)
        if recovered is not None:
            return HasToken(spec, recovered, current=True)
    held = obs.held
    if held is not None and held.inputs_hash == wanted and (held.refresh_at is None or obs.now < held.refresh_at):
        return HasToken(spec, held)  # the Secret is missing or was edited: rewrite it from memory
    return NeedsToken(spec, obs.source, remote_uid, refresh=holds_valid_token(obs))


def holds_valid_token(obs: Observation) -> bool:
    """True if the import's Secret (or memory) holds a token that has not expired: what is asked is a refresh."""
    expiries = [token_times(obs.own_secret)[1] if obs.own_secret is not None else None]
    if obs.held is not None:
        expiries.append(obs.held.expires_at)
    return any(expires_at is not None and expires_at > obs.now for expires_at in expiries)


def federated_inputs(spec: ImportSpec, source: FederatedSource) -> str:
    """What a federated Secret is written from: the spec and the source's server and CA."""
    return inputs_hash(spec, source.server, source.ca_pem)


def federated_audience(spec: ImportSpec, source: FederatedSource) -> str:
    """The audience of a federated import's projected token: its first spec.audiences, else the source's default
    (only once assess_federated has found every spec.audiences allowed by the source's record)."""
    return spec.audiences[0] if spec.audiences else source.audience


def assess_federated(obs: Observation, spec: ImportSpec) -> Blocked | NeedsTrustCheck | Federated:
    """A federated import needs its Secret (connection details, no token) and an answer to "does the source
    trust this cluster's tokens?", asked again once the last answer is stale."""
    blocked = check_secret_conflict(obs, spec)
    if blocked is not None:
        return blocked
    source = obs.federated
    if source is None:
        if obs.federated_error:
            message = f"The record of federated cluster {spec.cluster_name} is unusable: {obs.federated_error}"
        else:
            known = ", ".join(sorted(obs.known_federated)) or "none"
            message = (
                f"No federated source cluster is named {spec.cluster_name} (known: {known}); run kubemcsa federate "
                f"--target-context <this cluster> --source-context <{spec.cluster_name}>, or fix spec.clusterName."
            )
        return Blocked(api.REASON_UNKNOWN_CLUSTER, message, spec=spec)
    # The check's token goes to the source: its audience is one an admin recorded, never one the import chose.
    refusal = audience_refusal(spec.cluster_name, spec.audiences, source.allowed_audiences)
    if refusal is not None:
        return Blocked(api.REASON_AUDIENCE_NOT_ALLOWED, refusal, spec=spec)
    audience = federated_audience(spec, source)
    trust = obs.trust
    if trust is None or trust.audience != audience or obs.now >= trust.valid_until:
        return NeedsTrustCheck(spec, source, audience)
    return Federated(spec, source, trust)


# --- what to write ---------------------------------------------------------------------------------------------


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


def plan(obs: Observation, state: Blocked | HasToken | Federated) -> Writes:
    """The writes that bring the cluster to `state` (after assess, and after the token request if any)."""
    if isinstance(state, HasToken):
        writes = _plan_token(obs, state)
    elif isinstance(state, Federated):
        writes = _plan_federated(obs, state)
    else:
        writes = _plan_blocked(obs, state)
    return _plan_outputs(obs, state, writes)


def _plan_federated(obs: Observation, state: Federated) -> Writes:
    """The Secret (whatever the trust: it holds no secret, and pods start with it), and Ready as the source said."""
    spec, source, trust = state.spec, state.source, state.trust
    meta = metadata_of(obs.imp)
    name = api.secret_name_for_import(meta.get("name", ""))
    ours = obs.own_secret
    writes = Writes(requeue_at=trust.valid_until)
    wanted = federated_inputs(spec, source)
    if ours is None or not federated_secret_is_current(ours, wanted):
        body = federated_import_secret(
            obs.imp, source.server, source.ca_pem, spec.namespace, spec.cluster_name, wanted, ours
        )
        writes.secrets.append(SecretWrite(body, create=ours is None))
    remote_user = source.remote_user(str(meta.get("namespace", "")), REMOTE_USER_PLACEHOLDER)
    audience = federated_audience(spec, source)
    if trust.trusted:
        ready = _ready(
            "True",
            api.REASON_FEDERATED,
            f"Cluster {spec.cluster_name} trusts this cluster's service-account tokens for audience {audience}: "
            f"pods call it with their own projected tokens, as {remote_user}; no token is copied.",
            obs.imp,
        )
    else:
        ready = _ready(
            "False",
            api.REASON_FEDERATION_NOT_TRUSTED,
            f"{trust.problem}; add the AuthenticationConfiguration that kubemcsa federate --target-context "
            f"<this cluster> --source-context <{spec.cluster_name}> prints to that cluster's kube-apiserver, with "
            f"audience {audience}. The import turns Ready by itself once it does.",
            obs.imp,
        )
    writes.status = _status(obs.imp, obs.now, ready, name, None, None, remote_user=remote_user)
    if writes.status is not None and not trust.trusted and _condition_changed(obs.imp, ready):
        writes.events.append(("Warning", ready["reason"], ready["message"]))
    return writes


def _plan_token(obs: Observation, state: HasToken) -> Writes:
    spec, token = state.spec, state.token
    name = api.secret_name_for_import(metadata_of(obs.imp).get("name", ""))
    ours = obs.own_secret
    writes = Writes(requeue_at=token.refresh_at, remember=token, expires_at=token.expires_at)
    if not state.current:
        body = import_secret(obs.imp, token, spec.cluster_name, ours)
        writes.secrets.append(SecretWrite(body, create=ours is None))
        if ours is not None and as_dict(ours.get("data")).get(api.KEY_TOKEN) != body["data"][api.KEY_TOKEN]:
            until = "" if token.expires_at is None else f", valid until {format_time(token.expires_at)}"
            writes.events.append(("Normal", "TokenRefreshed", f"Refreshed the token in Secret {name}{until}."))
    ready = _ready("True", api.REASON_TOKEN_ISSUED, _ready_message(spec, token.expires_at), obs.imp)
    writes.status = _status(obs.imp, obs.now, ready, name, token.issued.issued_at, token.expires_at)
    return writes


def _plan_blocked(obs: Observation, state: Blocked) -> Writes:
    ours = obs.own_secret
    name = api.secret_name_for_import(metadata_of(obs.imp).get("name", ""))
    # A local name conflict means there is no Secret of ours (ours is None); a conflict in the source (its legacy
    # token Secret) keeps ours listed: the webhook mounts only what status.secrets lists once Ready says
    # SecretNameConflict (webhook.lookups.unowned_secret).
    keeps = ours is not None and not state.withdraw and state.reason != api.REASON_INVALID_SPEC
    issued_at, expires_at = token_times(ours) if keeps else (None, None)
    reason, message = state.reason, state.message
    writes = Writes(retry=state.retry, failure_reason=reason if state.retry else None)
    if state.withdraw:
        writes.forget = True
        if ours is not None:
            stripped = without_token(obs.imp, ours)
            if stripped is not None:
                writes.secrets.append(SecretWrite(stripped, create=False))
            # The same words before and after the token goes, so that the status is written once.
            message = f"{message} Secret {name} holds no token of it; tokens already issued stay valid in the "
            message += "source until they expire."
    if state.source_failed and expires_at is not None:
        if obs.now < expires_at:
            message = f"{message} The last token stays in Secret {name} until it expires at {format_time(expires_at)}."
            writes.requeue_at = expires_at  # then say it expired
            writes.expires_at = expires_at
        elif reason in CREDENTIAL_REASONS:  # the root cause, and its fix, stay first
            message = f"{message} The token in Secret {name} expired at {format_time(expires_at)}."
        else:
            reason = api.REASON_TOKEN_EXPIRED
            message = f"The token in Secret {name} expired at {format_time(expires_at)} and could not be refreshed: "
            message += state.message
    ready = _ready("False", reason, message, obs.imp)
    writes.status = _status(obs.imp, obs.now, ready, name if keeps else None, issued_at, expires_at)
    if writes.status is not None and _condition_changed(obs.imp, ready):
        writes.events.append(("Warning", reason, message))
    return writes


def _plan_outputs(obs: Observation, state: Blocked | HasToken | Federated, writes: Writes) -> Writes:
    """Add what each output's object needs, from the import Secret as it is after this pass, and its condition."""
    import_name = api.secret_name_for_import(metadata_of(obs.imp).get("name", ""))
    written = [w.body for w in writes.secrets if metadata_of(w.body).get("name") == import_name]
    import_secret_after = written[-1] if written else obs.own_secret
    withdrawn = isinstance(state, Blocked) and state.withdraw
    old = as_dict(obs.imp.get("status"))
    base = writes.status if writes.status is not None else old
    conditions = before = [c for c in as_list(base.get("conditions")) if isinstance(c, dict)]
    for output in OUTPUTS:
        action = plan_output(
            output,
            obs.imp,
            state.spec,
            import_secret_after,
            obs.outputs.get(output.name, Observed()),
            withdrawn=withdrawn,
            source=obs.source_view,
            now=obs.now,
        )
        if action.write is not None:
            writes.outputs.append(OutputWrite(output.name, action.write, create=action.create))
        if action.delete is not None:
            writes.outputs.append(OutputWrite(output.name, action.delete, delete=True))
        if action.report:
            conditions = _merge_output_condition(writes, conditions, output, action.condition, obs.now)
    if conditions == before:
        return writes
    new = {**base, "conditions": conditions}
    writes.status = None if new == old else new
    return writes


def _merge_output_condition(
    writes: Writes, conditions: list[dict[str, Any]], output: Output, wanted: dict[str, Any] | None, now: float
) -> list[dict[str, Any]]:
    """`conditions` with the output's condition set (or removed), and a Warning Event when it newly turns False."""
    said = [
        (c.get("status"), c.get("reason"), c.get("message"))
        for c in conditions
        if c.get("type") == output.condition_type
    ]
    if wanted is None:
        return [c for c in conditions if c.get("type") != output.condition_type]
    quiet = (*output.quiet_reasons, REASON_CACHE_NOT_SYNCED)
    warn = wanted["status"] == "False" and wanted["reason"] not in quiet
    if warn and said != [(wanted["status"], wanted["reason"], wanted["message"])]:
        writes.events.append(("Warning", wanted["reason"], wanted["message"]))
    return set_condition(conditions, wanted, now)


# --- status ----------------------------------------------------------------------------------------------------


def set_condition(conditions: Any, new: dict[str, Any], now: float) -> list[dict[str, Any]]:
    """Conditions with `new` set, keeping lastTransitionTime when the status did not change (metav1.Condition rules)."""
    result: list[dict[str, Any]] = []
    replaced = False
    for cond in as_list(conditions):
        if not isinstance(cond, dict):
            continue
        if cond.get("type") == new["type"]:
            merged = dict(new)
            same = cond.get("status") == new["status"] and cond.get("lastTransitionTime")
            merged["lastTransitionTime"] = cond["lastTransitionTime"] if same else format_time(now)
            result.append(merged)
            replaced = True
        else:
            result.append(cond)
    if not replaced:
        result.append({**new, "lastTransitionTime": format_time(now)})
    return result


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning status `old` into `new` (fields that disappear are set to null).

    The credential pins are left alone: only the writer of a credential records them, with a patch of its own
    guarded by the import's resourceVersion (kubemcsa.contract.imports.pins_patch), so a stale status never undoes
    them."""
    patch: dict[str, Any] = {key: None for key in (old or {}) if key not in new and key != STATUS_PINS}
    patch.update({key: value for key, value in new.items() if key != STATUS_PINS})
    return {"status": patch}


def _ready(status: str, reason: str, message: str, imp: dict[str, Any]) -> dict[str, Any]:
    cond = {"type": api.CONDITION_READY, "status": status, "reason": reason, "message": message}
    generation = metadata_of(imp).get("generation")
    if isinstance(generation, int):
        cond["observedGeneration"] = generation
    return cond


def _status(
    imp: dict[str, Any],
    now: float,
    ready: dict[str, Any],
    secret_name: str | None,
    issued_at: float | None,
    expires_at: float | None,
    remote_user: str | None = None,
) -> dict[str, Any] | None:
    """The new status, or None if it equals the current one (so the steady state writes nothing)."""
    old = as_dict(imp.get("status"))
    new: dict[str, Any] = {}
    if STATUS_PINS in old:  # not this pass's to change (see status_patch)
        new[STATUS_PINS] = old[STATUS_PINS]
    if secret_name:
        new["secrets"] = [{"name": secret_name}]
    new["conditions"] = set_condition(old.get("conditions"), ready, now)
    if expires_at is not None:
        new["expirationTimestamp"] = format_time(expires_at)
    if issued_at is not None:
        new["lastRefreshTime"] = format_time(issued_at)
    if remote_user is not None:
        new["remoteUser"] = remote_user
    generation = metadata_of(imp).get("generation")
    if isinstance(generation, int):
        new["observedGeneration"] = generation
    return None if new == old else new


def _condition_changed(imp: dict[str, Any], ready: dict[str, Any]) -> bool:
    for cond in as_list(as_dict(imp.get("status")).get("conditions")):
        if isinstance(cond, dict) and cond.get("type") == api.CONDITION_READY:
            return (cond.get("status"), cond.get("reason"), cond.get("message")) != (
                ready["status"],
                ready["reason"],
                ready["message"],
            )
    return True


def _ready_message(spec: ImportSpec, expires_at: float | None) -> str:
    what = f"service account {spec.namespace}/{spec.name} of cluster {spec.cluster_name}"
    if expires_at is None:
        return f"The Secret holds a legacy long-lived token of {what}."
    return f"The Secret holds a token of {what}, refreshed before it expires."
