"""The ClusterProfile output: `spec.clusterProfile: {}` publishes an import as a ClusterProfile (SIG Multicluster's
Cluster Inventory API, multicluster.x-k8s.io/v1alpha1, KEP-4322), so that fleet controllers (MultiKueue, Argo CD's
ApplicationSet, anything on the cluster-inventory-api's pkg/access) use the import without knowing this project.

The ClusterProfile is named after the import, in the import's namespace (whoever may create an import there may
already read its Secret there); its cluster manager is this project. Its `status.accessProviders` (and the
deprecated `credentialProviders`, the same list) say how to reach the source with the import's credentials
(KEP-5339 exec plugins; the extension `client.authentication.k8s.io/exec` reaches the plugin as
ExecCredential.spec.cluster.config):
- `kubeconfig-secretreader`, the cluster-inventory-api's standard plugin, unchanged: its extension names the
  import's Secret and its `config` key ({name, namespace, key}, as plugins/kubeconfig-secretreader reads it). Only
  for token imports: a federated import's kubeconfig has a tokenFile, which that plugin cannot use;
- `kubemcsa` (`kubemcsa credentials`): the import's Secret ({secretName, namespace}) or, for a federated import,
  the projected token file the webhook mounts in the consumer's pods ({tokenFile}).
`status.version.kubernetes` is the source's (asked once per source) and `ControlPlaneHealthy` is the controller's
own view of the source: False while its calls fail, its watch of the source's exports gets no answer, or its
credential for the source has expired; for a federated source, while its last /version (asked every
federated_probe_seconds) got no answer (controller/run.py wakes a source's imports when its reachability changes).
"""

from __future__ import annotations

import base64
import posixpath
from typing import Any

from controller.conditions import set_condition
from controller.outputs.base import Output, OutputInput, Owned, SourceView, Want, Watch
from kubemcsa.contract import api
from kubemcsa.contract.api import EXT_NAMESPACE, EXT_SECRET_NAME, EXT_TOKEN_FILE
from kubemcsa.contract.credentials import CredentialsError
from kubemcsa.contract.imports import as_dict, metadata_of, owner_reference, secret_credentials, string_map
from kubemcsa.contract.spec import ImportSpec, SpecError

GROUP = "multicluster.x-k8s.io"
API_VERSION = f"{GROUP}/v1alpha1"
KIND = "ClusterProfile"
PLURAL = "clusterprofiles"
CLUSTER_MANAGER = "multicluster-service-account"  # spec.clusterManager.name, and the label below
CLUSTER_MANAGER_LABEL = "x-k8s.io/cluster-manager"
EXEC_EXTENSION = "client.authentication.k8s.io/exec"
PROVIDER_SECRETREADER = "kubeconfig-secretreader"  # the name pkg/access consumers configure for that plugin
PROVIDER_KUBEMCSA = "kubemcsa"

CONDITION_CLUSTER_PROFILE = "ClusterProfileReady"
CONDITION_HEALTHY = "ControlPlaneHealthy"  # on the ClusterProfile (the API's predefined type)
REASON_WRITTEN = "ClusterProfileWritten"
REASON_WAITING = "WaitingForSecret"
REASON_CONFLICT = "ClusterProfileNameConflict"
REASON_CRD_MISSING = "ClusterProfileCRDNotInstalled"


def parse(spec: ImportSpec, section: Any) -> dict[str, Any] | None:
    """spec.clusterProfile: an object (no fields yet), or None when absent."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise SpecError("spec.clusterProfile must be an object (for example {}); fix or remove it.")
    return section


def access_providers(imp: dict[str, Any], spec: ImportSpec, server: str, ca_pem: bytes) -> list[dict[str, Any]]:
    """The accessProviders entries for the import: where the source is, and each plugin's extension."""
    meta = metadata_of(imp)
    name, namespace = str(meta.get("name", "")), str(meta.get("namespace", ""))
    secret = api.secret_name_for_import(name)
    if spec.federated:
        token_file = posixpath.join(api.mount_path_for_import(name), api.KEY_TOKEN)
        ours: dict[str, Any] = {EXT_TOKEN_FILE: token_file}
        providers = []
    else:
        ours = {EXT_SECRET_NAME: secret, EXT_NAMESPACE: namespace}
        # plugins/kubeconfig-secretreader: name and key required, namespace optional (ours: always set).
        reader = {"name": secret, "namespace": namespace, "key": api.KEY_CONFIG}
        providers = [_provider(PROVIDER_SECRETREADER, server, ca_pem, reader)]
    return [_provider(PROVIDER_KUBEMCSA, server, ca_pem, ours), *providers]


def _provider(name: str, server: str, ca_pem: bytes, extension: dict[str, Any]) -> dict[str, Any]:
    cluster = {
        "server": server,
        "certificate-authority-data": base64.b64encode(ca_pem).decode(),
        "extensions": [{"name": EXEC_EXTENSION, "extension": extension}],
    }
    return {"name": name, "cluster": cluster}


def health_condition(source: SourceView | None, now: float) -> dict[str, str]:
    """ControlPlaneHealthy from what the controller itself sees of the source."""
    if source is None:
        return _healthy("Unknown", "SourceUnknown", "The controller does not know this cluster now.")
    if source.unreachable:
        return _healthy("False", "Unreachable", f"Cluster {source.cluster_name} does not answer: {source.unreachable}.")
    expires = source.credential_expires_at
    if expires is not None and now >= expires:
        message = f"The controller's own credential for cluster {source.cluster_name} has expired; renew it."
        return _healthy("False", "CredentialExpired", message)
    return _healthy("True", "Reachable", f"Cluster {source.cluster_name} answers the controller.")


def _healthy(status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": CONDITION_HEALTHY, "status": status, "reason": reason, "message": message}


def desired_cluster_profile(inp: OutputInput, server: str, ca_pem: bytes) -> dict[str, Any]:
    """The ClusterProfile of the import, built on ours (keeping others' labels, annotations, status fields)."""

    meta = metadata_of(inp.imp)
    old_meta = metadata_of(inp.existing)
    labels = string_map(old_meta.get("labels"))
    labels.update({CLUSTER_MANAGER_LABEL: CLUSTER_MANAGER, api.IMPORT_LABEL: str(meta.get("name", ""))})
    new_meta: dict[str, Any] = {
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),  # always the import's own: no import places one elsewhere
        "labels": labels,
        "annotations": string_map(old_meta.get("annotations")),
        "ownerReferences": [owner_reference(inp.imp)],
    }
    if old_meta.get("resourceVersion"):
        new_meta["resourceVersion"] = old_meta["resourceVersion"]
    old_status = as_dict(as_dict(inp.existing).get("status"))
    providers = access_providers(inp.imp, inp.spec, server, ca_pem)
    status = {**old_status, "accessProviders": providers, "credentialProviders": providers}
    version = inp.source.version if inp.source is not None else None
    if version:
        status["version"] = {"kubernetes": version}
    status["conditions"] = set_condition(old_status.get("conditions"), health_condition(inp.source, inp.now), inp.now)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": new_meta,
        "spec": {"displayName": inp.spec.cluster_name, "clusterManager": {"name": CLUSTER_MANAGER}},
        "status": status,
    }


def _is_current(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    have, want = metadata_of(existing), metadata_of(wanted)
    return (
        as_dict(have.get("labels")) == want["labels"]
        and (have.get("ownerReferences") or [None])[0] == want["ownerReferences"][0]
        and existing.get("spec") == wanted["spec"]
        and existing.get("status") == wanted["status"]
    )


def _desire(inp: OutputInput) -> Want:
    name = str(metadata_of(inp.imp).get("name", ""))
    if inp.withdrawn:  # no access any more: consumers should not see a cluster they cannot call
        message = f"ClusterProfile {name} is written once the service account is exported."
        return Want(OUTPUT.condition("False", api.REASON_NOT_EXPORTED, message), delete=True)
    try:
        creds = secret_credentials(inp.import_secret, require_token=not inp.spec.federated)
    except CredentialsError:
        if inp.existing is not None:  # the import's Secret lost its token: the ClusterProfile still says where
            return Want(_written(name, inp.spec))
        message = f"ClusterProfile {name} is written once the import's own Secret is."
        return Want(OUTPUT.condition("False", REASON_WAITING, message))
    return Want(_written(name, inp.spec), body=desired_cluster_profile(inp, creds.server, creds.ca_crt))


def _written(name: str, spec: ImportSpec) -> dict[str, str]:
    plugins = PROVIDER_KUBEMCSA if spec.federated else f"{PROVIDER_SECRETREADER} or {PROVIDER_KUBEMCSA}"
    message = f"ClusterProfile {name} publishes cluster {spec.cluster_name} to this namespace's consumers ({plugins})."
    return OUTPUT.condition("True", REASON_WRITTEN, message)


OUTPUT = Output(
    name="clusterprofile",
    spec_field="clusterProfile",
    condition_type=CONDITION_CLUSTER_PROFILE,
    owns=Owned(API_VERSION, KIND, PLURAL, name_for=lambda import_name: import_name, status_subresource=True),
    # Every ClusterProfile (a foreign one named like an import is seen, and left alone); the CRD is optional.
    watch=Watch(
        name="clusterprofiles",
        label_selector=None,
        import_for=lambda obj: metadata_of(obj).get("name") or None,
        optional=True,
    ),
    parse=parse,
    desire=_desire,
    is_current=_is_current,
    conflict_reason=REASON_CONFLICT,
    quiet_reasons=(REASON_WAITING,),
    unavailable_reason=REASON_CRD_MISSING,
    install_hint="install the ClusterProfile CRD (the manifests/clusterprofile component); the import turns "
    "ClusterProfileReady by itself then.",
    wants_source_version=True,
)
