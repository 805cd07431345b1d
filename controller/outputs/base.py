"""What an output is, and the planning every output shares (pure: data in, data out; no client, no clock).

An output turns an import and its Secret (as it is after this pass), plus the controller's own view of the
source, into one more object in the import's namespace, named after the import and controlled by it. Each
output is one module holding an `Output`: what it owns, what it watches, how it parses its own spec section,
and `desire`, which says what the object should be. Everything else is generic and lives here:
- an invalid spec touches nothing; no spec section: ours is deleted (uid and resourceVersion preconditions)
  and the condition goes;
- an object of that name the import does not control is never written over (the condition says so);
- a watch that cannot list (a CRD not installed) turns the output off: imports asking for it say why;
- a write happens only when the object differs from the cached one, so the steady state writes nothing.
The reconciler (controller/reconciler.py), assess/plan (controller/assess.py) and the wiring
(controller/run.py) iterate the registry in controller/outputs/__init__.py and know no output by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubemcsa.contract.imports import is_controlled_by, metadata_of
from kubemcsa.contract.spec import ImportSpec

# An optional watch that has not listed yet (its API may be starting): a wait, said without a Warning Event.
REASON_CACHE_NOT_SYNCED = "CacheNotSynced"


@dataclass(frozen=True)
class Owned:
    """The kind of object an output keeps: one per import, in the import's namespace, named by `name_for`."""

    api_version: str
    kind: str
    plural: str
    name_for: Callable[[str], str]  # the object's name from the import's name
    status_subresource: bool = False  # its status is written with a second call (PUT .../status)


@dataclass(frozen=True)
class Watch:
    """The informer an output needs over the type it owns (ours and foreign ones of the names it uses)."""

    name: str  # the informer's name (logs, metrics)
    label_selector: str | None  # None: every object of the type
    import_for: Callable[[dict[str, Any]], str | None]  # the import (same namespace) an object's event concerns
    # True: the type may not be served (an optional CRD): the controller runs without it, the output is off.
    optional: bool = False


@dataclass(frozen=True)
class SourceView:
    """What the controller itself knows of an import's source: where it is, whether it answers, its version."""

    cluster_name: str
    server: str
    ca_pem: bytes = field(repr=False)
    federated: bool = False
    # Why the controller's calls to it fail now (its circuit is open), None while it answers.
    unreachable: str | None = None
    credential_expires_at: float | None = None  # the controller's own credential for it, if known
    version: str | None = None  # its Kubernetes version (gitVersion), for outputs that ask for it


@dataclass(frozen=True)
class OutputInput:
    """What an output's `desire` sees of one import (its spec section parsed as `config`)."""

    imp: dict[str, Any]
    spec: ImportSpec
    config: Any
    import_secret: dict[str, Any] | None  # the import's own Secret as it is after this pass (written or cached)
    existing: dict[str, Any] | None  # the output's object, controlled by this import (None: none yet)
    withdrawn: bool  # the source no longer exports the service account: no object may keep its token
    source: SourceView | None
    now: float


@dataclass(frozen=True)
class Want:
    """What an output wants: `body` to be written (when it differs from ours), `delete` ours, or neither
    (keep what exists, say the last good one); and the condition to report."""

    condition: dict[str, Any]
    body: dict[str, Any] | None = None
    delete: bool = False


@dataclass(frozen=True)
class Output:
    name: str  # a short name for logs and the reconciler's bookkeeping
    spec_field: str  # its section of the import's spec, e.g. "argoCD"
    condition_type: str  # the one condition it reports on the import
    owns: Owned
    watch: Watch
    parse: Callable[[ImportSpec, Any], Any]  # (the import's spec, its section) -> config or None; raises SpecError
    desire: Callable[[OutputInput], Want]
    is_current: Callable[[dict[str, Any], dict[str, Any]], bool]  # (cached, wanted): nothing to write
    conflict_reason: str  # the condition reason when a foreign object holds the name
    quiet_reasons: tuple[str, ...] = ()  # False reasons that are a normal wait, not a Warning event
    unavailable_reason: str = "NotInstalled"
    install_hint: str = ""  # how to make an unavailable watch list (said in the condition)
    wants_source_version: bool = False  # SourceView.version is asked for (once per source) when set

    def condition(self, status: str, reason: str, message: str) -> dict[str, str]:
        return {"type": self.condition_type, "status": status, "reason": reason, "message": message}


@dataclass(frozen=True)
class Observed:
    """An output's object as the controller's cache has it, and whether that cache can list at all."""

    obj: dict[str, Any] | None = None
    available: bool = True
    problem: str = ""  # why it cannot list, when it cannot
    not_served: bool = False  # the API server does not serve the type at all (its CRD is not installed)


@dataclass(frozen=True)
class OutputAction:
    """The one write, if any, an output's object needs, and the condition to report (None: no condition)."""

    write: dict[str, Any] | None = None  # the object to create (create=True) or replace
    create: bool = False
    delete: dict[str, Any] | None = None  # the cached object to delete (its uid and resourceVersion as preconditions)
    condition: dict[str, str] | None = None  # type, status, reason, message; None: no such condition
    report: bool = True  # False: leave the condition as it is (the spec is invalid, so nothing is known)


def conflict_message(output: Output, name: str, namespace: Any) -> str:
    kind = output.owns.kind
    return (
        f"A {kind} named {name} already exists in namespace {namespace} and is not controlled by this import; "
        f"delete or rename that {kind}, or rename the import."
    )


def plan_output(
    output: Output,
    imp: dict[str, Any],
    spec: ImportSpec | None,
    import_secret: dict[str, Any] | None,
    observed: Observed,
    *,
    withdrawn: bool = False,
    source: SourceView | None = None,
    now: float = 0.0,
) -> OutputAction:
    """Decide for the output's object of `imp`, given its parsed spec (None if invalid), the import's Secret as
    it is after this pass, and the object as cached (or None)."""
    if spec is None:  # an invalid spec: keep what exists, report nothing new
        return OutputAction(report=False)
    meta = metadata_of(imp)
    existing = observed.obj
    ours = existing is not None and is_controlled_by(existing, meta.get("uid", ""))
    config = output.parse(spec, as_section(imp, output.spec_field))
    if config is None:
        return OutputAction(delete=existing if ours else None)
    if not observed.available:
        message = f"The controller cannot list {output.owns.kind}s in this cluster ({observed.problem})"
        if observed.not_served:
            message += f"; {output.install_hint}" if output.install_hint else "."
            return OutputAction(condition=output.condition("False", output.unavailable_reason, message))
        return OutputAction(condition=output.condition("False", REASON_CACHE_NOT_SYNCED, message + "; it retries."))
    name = output.owns.name_for(meta.get("name", ""))
    if existing is not None and not ours:
        message = conflict_message(output, name, meta.get("namespace"))
        return OutputAction(condition=output.condition("False", output.conflict_reason, message))
    want = output.desire(
        OutputInput(imp, spec, config, import_secret, existing if ours else None, withdrawn, source, now)
    )
    if want.delete:
        return OutputAction(delete=existing if ours else None, condition=want.condition)
    if want.body is None or (ours and existing is not None and output.is_current(existing, want.body)):
        return OutputAction(condition=want.condition)
    return OutputAction(write=want.body, create=not ours, condition=want.condition)


def as_section(imp: dict[str, Any], spec_field: str) -> Any:
    """The raw section `spec.<spec_field>` of an import (None if absent or the spec is no object)."""
    spec = imp.get("spec")
    return spec.get(spec_field) if isinstance(spec, dict) else None
