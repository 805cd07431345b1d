"""What one ServiceAccountImport needs, decided from data alone (no API call, no clock, no I/O).

A reconcile pass (controller/reconciler.py) observes the caches into an `Observation`, calls `assess` once,
acts on the answer (a token request only for `NeedsToken`), then calls `plan` with what it has in the end: a
`HasToken` or a `Blocked`. `plan` says what to write. Neither runs twice.

To add a reason an import is blocked (say, the source does not export the service account), add a check to
`CHECKS`: a function of the Observation and the spec that returns a `Blocked`, or None to let the import on."""

from __future__ import annotations

from collections.abc import Callable

from controller.model import Assessment, Blocked, Federated, HasToken, NeedsToken, NeedsTrustCheck, Observation
from controller.outputs import OUTPUTS
from controller.outputs.base import as_section
from kubemcsa.contract import api
from kubemcsa.contract.export_policy import export_verdict
from kubemcsa.contract.federation import FederatedSource, audience_refusal
from kubemcsa.contract.imports import (
    inputs_hash,
    metadata_of,
    secret_is_current,
    token_from_secret,
    token_times,
)
from kubemcsa.contract.spec import ImportSpec, SpecError, parse_spec

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
