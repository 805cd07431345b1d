"""The Argo CD output: an import's Argo CD cluster Secret, decided from data alone (no API call, no clock).

The Secret `<import>-argocd` sits next to the import's own Secret and carries the same credentials in Argo CD's
format (kubemcsa.contract.argocd). It follows the import's Secret: written once that Secret holds what Argo CD needs (a
token, or for a federated import the server and CA), rewritten whenever the token changes, deleted when
spec.argoCD goes, left alone (and reported) when a Secret of that name belongs to someone else. A failed refresh
changes nothing: the last good token stays."""

from __future__ import annotations

import posixpath
from typing import Any

from controller.outputs.base import Observed, Output, OutputAction, OutputInput, Owned, Want, Watch, plan_output
from kubemcsa.contract import api, argocd
from kubemcsa.contract.credentials import CredentialsError
from kubemcsa.contract.imports import as_dict, controlled_secret, metadata_of, secret_credentials, string_map
from kubemcsa.contract.spec import ImportSpec

CONDITION_ARGOCD = "ArgoCDSecretReady"
REASON_WRITTEN = "SecretWritten"
REASON_WAITING = "WaitingForToken"

ArgoCDAction = OutputAction  # the name the Argo CD tests know


def desired_argocd_data(
    imp: dict[str, Any], spec: ImportSpec, import_secret: dict[str, Any] | None
) -> dict[str, str] | None:
    """Argo CD's data for the import's Secret, or None while that Secret is not usable yet.

    A federated import's Secret has no token: Argo CD's pods get the projected token file the webhook mounts for
    the import (their pod templates carry the import annotation) and read it with an exec plugin."""
    assert spec.argocd is not None
    try:
        creds = secret_credentials(import_secret, require_token=not spec.federated)
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


def _desire(inp: OutputInput) -> Want:
    name = api.argocd_secret_name_for_import(metadata_of(inp.imp).get("name", ""))
    if inp.withdrawn:
        message = f"Secret {name} is written once the service account is exported."
        return Want(OUTPUT.condition("False", api.REASON_NOT_EXPORTED, message), delete=True)
    data = desired_argocd_data(inp.imp, inp.spec, inp.import_secret)
    if data is None:
        if inp.existing is not None:  # the import's Secret lost its token (or never had one): Argo CD keeps the last
            return Want(_written(name, inp.config))
        message = f"Secret {name} is written once the import's own Secret is."
        return Want(OUTPUT.condition("False", REASON_WAITING, message))
    return Want(_written(name, inp.config), body=desired_argocd_secret(inp.imp, data, inp.existing))


def _written(name: str, cluster: argocd.ArgoCDCluster) -> dict[str, str]:
    message = f"Secret {name} registers this cluster in Argo CD as {cluster.name!r}."
    return OUTPUT.condition("True", REASON_WRITTEN, message)


OUTPUT = Output(
    name="argocd",
    spec_field="argoCD",
    condition_type=CONDITION_ARGOCD,
    owns=Owned("v1", "Secret", "secrets", name_for=api.argocd_secret_name_for_import),
    # Every Argo CD cluster Secret, ours or not: a hand-written one named like an import's is seen, and left alone.
    watch=Watch(
        name="argocd-cluster-secrets",
        label_selector=f"{argocd.SECRET_TYPE_LABEL}={argocd.SECRET_TYPE_CLUSTER}",
        import_for=lambda obj: api.import_name_for_argocd_secret(metadata_of(obj).get("name", "")),
    ),
    parse=lambda spec, section: spec.argocd,  # spec.argoCD is part of the import's contract (kubemcsa.contract.spec)
    desire=_desire,
    is_current=_is_current,
    conflict_reason=api.REASON_SECRET_CONFLICT,
    quiet_reasons=(REASON_WAITING,),
)


def assess_argocd_secret(
    imp: dict[str, Any],
    spec: ImportSpec | None,
    import_secret: dict[str, Any] | None,
    existing: dict[str, Any] | None,
    *,
    withdrawn: bool = False,
) -> OutputAction:
    """Decide for the Argo CD Secret of `imp`, given its parsed spec (None if invalid), the import's Secret as it is
    (or is being written) and the Argo CD Secret as cached (or None). `withdrawn`: the source no longer exports the
    service account, so no Secret may keep its token."""
    return plan_output(OUTPUT, imp, spec, import_secret, Observed(existing), withdrawn=withdrawn)
