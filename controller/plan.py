"""What to write for one ServiceAccountImport, decided from data alone (no API call, no clock, no I/O).

After assess (controller/assess.py) and the token request if one was needed, `plan` turns the final state
(`HasToken`, `Federated` or `Blocked`) into `Writes`: the import Secret, each output's object
(controller/outputs/), the status and the Events. An empty `Writes` is the steady state.
"""

from __future__ import annotations

from typing import Any

from controller.assess import federated_audience, federated_inputs
from controller.conditions import condition_changed, import_status, ready_condition, set_condition
from controller.model import (
    CREDENTIAL_REASONS,
    Blocked,
    Federated,
    HasToken,
    Observation,
    OutputWrite,
    SecretWrite,
    Writes,
)
from controller.outputs import OUTPUTS
from controller.outputs.base import REASON_CACHE_NOT_SYNCED, Observed, Output, plan_output
from kubemcsa.contract import api
from kubemcsa.contract.federation import REMOTE_USER_PLACEHOLDER
from kubemcsa.contract.imports import (
    as_dict,
    as_list,
    federated_import_secret,
    federated_secret_is_current,
    import_secret,
    metadata_of,
    secret_token,
    token_times,
    without_token,
)
from kubemcsa.contract.spec import ImportSpec
from kubemcsa.contract.timefmt import format_time


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
        ready = ready_condition(
            "True",
            api.REASON_FEDERATED,
            f"Cluster {spec.cluster_name} trusts this cluster's service-account tokens for audience {audience}: "
            f"pods call it with their own projected tokens, as {remote_user}; no token is copied.",
            obs.imp,
        )
    else:
        ready = ready_condition(
            "False",
            api.REASON_FEDERATION_NOT_TRUSTED,
            f"{trust.problem}; add the AuthenticationConfiguration that kubemcsa federate --target-context "
            f"<this cluster> --source-context <{spec.cluster_name}> prints to that cluster's kube-apiserver, with "
            f"audience {audience}. The import turns Ready by itself once it does.",
            obs.imp,
        )
    writes.status = import_status(obs.imp, obs.now, ready, name, None, None, remote_user=remote_user)
    if writes.status is not None and not trust.trusted and condition_changed(obs.imp, ready):
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
        if ours is not None and secret_token(ours) != token.credentials.token:
            until = "" if token.expires_at is None else f", valid until {format_time(token.expires_at)}"
            writes.events.append(("Normal", "TokenRefreshed", f"Refreshed the token in Secret {name}{until}."))
    ready = ready_condition("True", api.REASON_TOKEN_ISSUED, _ready_message(spec, token.expires_at), obs.imp)
    writes.status = import_status(obs.imp, obs.now, ready, name, token.issued.issued_at, token.expires_at)
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
    ready = ready_condition("False", reason, message, obs.imp)
    writes.status = import_status(obs.imp, obs.now, ready, name if keeps else None, issued_at, expires_at)
    if writes.status is not None and condition_changed(obs.imp, ready):
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


def _ready_message(spec: ImportSpec, expires_at: float | None) -> str:
    what = f"service account {spec.namespace}/{spec.name} of cluster {spec.cluster_name}"
    if expires_at is None:
        return f"The Secret holds a legacy long-lived token of {what}."
    return f"The Secret holds a token of {what}, refreshed before it expires."
