"""What to do with an import's Argo CD cluster Secret, decided from data alone (no API call, no clock).

The Secret `<import>-argocd` sits next to the import's own Secret and carries the same credentials in Argo CD's
format (kubemcsa.argocd). It follows the import's Secret: written once that Secret holds what Argo CD needs (a
token, or for a federated import the server and CA), rewritten whenever the token changes, deleted when
spec.argoCD goes, left alone (and reported) when a Secret of that name belongs to someone else. A failed refresh
changes nothing: the last good token stays."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from kubemcsa import api, argocd
from kubemcsa.credentials import CredentialsError, from_secret_data
from kubemcsa.imports import as_dict, controlled_secret, is_controlled_by, metadata_of, string_map
from kubemcsa.spec import ImportSpec

CONDITION_ARGOCD = "ArgoCDSecretReady"
REASON_WRITTEN = "SecretWritten"
REASON_WAITING = "WaitingForToken"


@dataclass(frozen=True)
class ArgoCDAction:
    """The one write, if any, the Argo CD Secret needs, and the condition to report (None: no condition)."""

    write: dict[str, Any] | None = None  # the Secret to create (create=True) or replace
    create: bool = False
    delete: dict[str, Any] | None = None  # the cached Secret to delete (its uid and resourceVersion as preconditions)
    condition: dict[str, str] | None = None  # type, status, reason, message; None: no such condition
    report: bool = True  # False: leave the condition as it is (the spec is invalid, so nothing is known)


def _condition(status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": CONDITION_ARGOCD, "status": status, "reason": reason, "message": message}


def desired_argocd_data(
    imp: dict[str, Any], spec: ImportSpec, import_secret: dict[str, Any] | None
) -> dict[str, str] | None:
    """Argo CD's data for the import's Secret, or None while that Secret is not usable yet.

    A federated import's Secret has no token: Argo CD's pods get the projected token file the webhook mounts for
    the import (their pod templates carry the import annotation) and read it with an exec plugin."""
    assert spec.argocd is not None
    try:
        creds = from_secret_data(as_dict(import_secret).get("data"), require_token=not spec.federated)
    except CredentialsError:
        return None
    if spec.federated:
        token_file = posixpath.join(api.mount_path_for_import(metadata_of(imp).get("name", "")), api.KEY_TOKEN)
        config = argocd.token_file_config(token_file, creds.ca_crt)
    else:
        config = argocd.bearer_token_config(creds.token, creds.ca_crt)
    return argocd.cluster_secret_data(spec.argocd, creds.server, config)


def desired_argocd_secret(imp: dict[str, Any], data: dict[str, str], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The Argo CD Secret of `imp` holding `data`, built on `existing` (keeping its resourceVersion, others' keys)."""
    meta = metadata_of(imp)
    old_meta = metadata_of(existing)
    labels = string_map(old_meta.get("labels"))
    labels.update(argocd.CLUSTER_LABELS)
    # The controller's Secret informer selects on this label: the Secret is seen, and maps back to its import.
    labels[api.IMPORT_LABEL] = meta["name"]
    annotations = string_map(old_meta.get("annotations"))
    name = api.argocd_secret_name_for_import(meta["name"])
    return controlled_secret(imp, name, data, labels, annotations, existing)


def _is_current(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    have, want = metadata_of(existing), metadata_of(wanted)
    return (
        as_dict(existing.get("data")) == wanted["data"]
        and as_dict(have.get("labels")) == want["labels"]
        and (have.get("ownerReferences") or [None])[0] == want["ownerReferences"][0]
    )


def assess_argocd_secret(
    imp: dict[str, Any],
    spec: ImportSpec | None,
    import_secret: dict[str, Any] | None,
    existing: dict[str, Any] | None,
    *,
    withdrawn: bool = False,
) -> ArgoCDAction:
    """Decide for the Argo CD Secret of `imp`, given its parsed spec (None if invalid), the import's Secret as it is
    (or is being written) and the Argo CD Secret as cached (or None). `withdrawn`: the source no longer exports the
    service account, so no Secret may keep its token."""
    meta = metadata_of(imp)
    name = api.argocd_secret_name_for_import(meta.get("name", ""))
    if spec is None:  # an invalid spec: keep what exists, report nothing new
        return ArgoCDAction(report=False)
    ours = existing is not None and is_controlled_by(existing, meta.get("uid", ""))
    if spec.argocd is None:
        return ArgoCDAction(delete=existing if ours else None)
    if existing is not None and not ours:
        return ArgoCDAction(
            condition=_condition(
                "False",
                api.REASON_SECRET_CONFLICT,
                f"A Secret named {name} already exists in namespace {meta.get('namespace')} and is not controlled "
                "by this import; delete or rename that Secret, or rename the import.",
            )
        )
    if withdrawn:
        return ArgoCDAction(
            delete=existing if ours else None,
            condition=_condition(
                "False", api.REASON_NOT_EXPORTED, f"Secret {name} is written once the service account is exported."
            ),
        )
    data = desired_argocd_data(imp, spec, import_secret)
    if data is None:
        if ours:  # the import's Secret lost its token (or never had one): Argo CD keeps the last good one
            return ArgoCDAction(condition=_written(name, spec.argocd))
        return ArgoCDAction(
            condition=_condition("False", REASON_WAITING, f"Secret {name} is written once the import's own Secret is.")
        )
    wanted = desired_argocd_secret(imp, data, existing)
    condition = _written(name, spec.argocd)
    if ours and existing is not None and _is_current(existing, wanted):
        return ArgoCDAction(condition=condition)
    return ArgoCDAction(write=wanted, create=not ours, condition=condition)


def _written(name: str, cluster: argocd.ArgoCDCluster) -> dict[str, str]:
    return _condition("True", REASON_WRITTEN, f"Secret {name} registers this cluster in Argo CD as {cluster.name!r}.")
