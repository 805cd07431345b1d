"""A stand-in for the kubelet's volume work: a pod's Secret and projected volumes written as files, and rotated.

Neither tier runs pods (the in-memory server has no kubelet, the real control planes no node). Tests that need
what a container would see call `Kubelet.mount(namespace, pod)`, on either tier: it reads the pod, Secrets and
ConfigMaps through the API with the admin token, as the kubelet reads them with its own.
each `secret` or `projected` volume of the stored pod is written as the kubelet writes it (a timestamped directory
behind a `..data` symlink, one symlink per file, swapped atomically on update), and each container's volumeMounts
become symlinks under `container_root(...)`, so that a container path such as
`/var/run/secrets/admiralty.io/serviceaccountimports/x/token` is `container_root(...) / that path`.

A projected `serviceAccountToken` source is a TokenRequest for the pod's own service account, bound to the pod,
with the source's `audience` (default: the API server's own) and `expirationSeconds` (default 3600, at least 600),
as the kubelet requests it; `rotate()` requests new tokens and rewrites the files, as the kubelet does at 80 % of
their lifetime.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException

from kubemcsa.client import kube

if TYPE_CHECKING:
    from kubemcsa_testing.server import ApiServer

DEFAULT_TOKEN_EXPIRATION_SECONDS = 3600
_DATA_LINK = "..data"


class VolumeError(Exception):
    """A volume the kubelet could not set up (the pod would stay ContainerCreating); the message says why."""


@dataclass
class _Volume:
    namespace: str
    pod: dict[str, Any]
    volume: dict[str, Any]
    directory: Path
    refresh_at: list[float] = field(default_factory=list)


class Kubelet:
    """Writes the Secret and projected volumes of pods stored in one ApiServer under `root`."""

    def __init__(self, server: ApiServer | Any, root: str | os.PathLike[str]) -> None:
        """`server`: an in-memory ApiServer or a real ControlPlane (anything with admin_client())."""
        self.server = server
        self.root = Path(root)
        self._client = server.admin_client()
        self._volumes: dict[tuple[str, str, str], _Volume] = {}

    def __repr__(self) -> str:
        return f"Kubelet(server={self.server.name!r}, root={str(self.root)!r})"

    def _get(self, rtype: kube.ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return kube.Resource(self._client, rtype).get(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _pod(self, namespace: str, name: str) -> dict[str, Any]:
        pod = self._get(kube.PODS, namespace, name)
        if pod is None:
            raise VolumeError(f'pod "{namespace}/{name}" does not exist')
        return pod

    def container_root(self, namespace: str, pod: str, container: str) -> Path:
        """The directory that stands for the container's `/`: its volume mounts are symlinks below it."""
        return self.root / namespace / pod / "containers" / container

    def mount(self, namespace: str, pod_name: str) -> None:
        """Set up every Secret and projected volume of the pod and each container's mounts of them."""
        pod = self._pod(namespace, pod_name)
        spec = pod.get("spec") or {}
        written: dict[str, Path] = {}
        for volume in spec.get("volumes") or []:
            if "secret" not in volume and "projected" not in volume:
                continue
            directory = self.root / namespace / pod_name / "volumes" / volume["name"]
            entry = _Volume(namespace, pod, volume, directory)
            self._write(entry)
            self._volumes[(namespace, pod_name, volume["name"])] = entry
            written[volume["name"]] = directory
        for kind in ("initContainers", "containers"):
            for container in spec.get(kind) or []:
                base = self.container_root(namespace, pod_name, container["name"])
                for mount in container.get("volumeMounts") or []:
                    target = written.get(mount.get("name"))
                    if target is None:
                        continue
                    link = base / str(mount["mountPath"]).lstrip("/")
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if link.is_symlink():
                        link.unlink()
                    link.symlink_to(target, target_is_directory=True)

    def rotate(self, now: float | None = None, *, force: bool = True) -> int:
        """Rewrite the volumes that carry a service-account token (all of them, or with force=False only those
        past 80 % of their lifetime, as the kubelet decides); returns how many were rewritten."""
        current = time.time() if now is None else now
        count = 0
        for entry in self._volumes.values():
            if not entry.refresh_at:
                continue
            if force or any(current >= expiry for expiry in entry.refresh_at):
                self._write(entry)
                count += 1
        return count

    def refresh(self) -> None:
        """Rewrite every mounted volume from the current Secrets (the kubelet's periodic sync)."""
        for entry in self._volumes.values():
            self._write(entry)

    # --- what a volume holds ------------------------------------------------------------------------------

    def _files(self, entry: _Volume) -> tuple[dict[str, bytes], list[float]]:
        volume, namespace = entry.volume, entry.namespace
        files: dict[str, bytes] = {}
        refresh_at: list[float] = []
        if "secret" in volume:
            source = volume["secret"] or {}
            files.update(self._secret_files(namespace, source.get("secretName"), source))
            return files, refresh_at
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "secret" in source:
                files.update(self._secret_files(namespace, source["secret"].get("name"), source["secret"]))
            elif "serviceAccountToken" in source:
                token_source = source["serviceAccountToken"]
                token, lifetime = self._token(entry, token_source)
                files[token_source["path"]] = token.encode()
                refresh_at.append(time.time() + 0.8 * lifetime)
            elif "configMap" in source:
                files.update(self._config_map_files(namespace, source["configMap"]))
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    if (item.get("fieldRef") or {}).get("fieldPath") == "metadata.namespace":
                        files[item["path"]] = namespace.encode()
        return files, refresh_at

    def _secret_files(self, namespace: str, name: Any, source: dict[str, Any]) -> dict[str, bytes]:
        secret = self._get(kube.SECRETS, namespace, str(name))
        optional = bool(source.get("optional"))
        if secret is None:
            if optional:
                return {}
            raise VolumeError(f'secret "{name}" not found in namespace {namespace}')
        data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
        items = source.get("items")
        if not items:
            return data
        files: dict[str, bytes] = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise VolumeError(f'secret "{name}" in namespace {namespace} has no key "{item["key"]}"')
            files[item.get("path") or item["key"]] = data[item["key"]]
        return files

    def _config_map_files(self, namespace: str, source: dict[str, Any]) -> dict[str, bytes]:
        config_map = self._get(kube.CONFIG_MAPS, namespace, str(source.get("name")))
        if config_map is None:
            if source.get("optional"):
                return {}
            raise VolumeError(f'configmap "{source.get("name")}" not found in namespace {namespace}')
        data = {key: str(value).encode() for key, value in (config_map.get("data") or {}).items()}
        items = source.get("items")
        if not items:
            return data
        return {item.get("path") or item["key"]: data[item["key"]] for item in items if item["key"] in data}

    def _token(self, entry: _Volume, source: dict[str, Any]) -> tuple[str, int]:
        """A TokenRequest for the pod's service account, bound to the pod, as the kubelet makes it."""
        spec = entry.pod.get("spec") or {}
        service_account = spec.get("serviceAccountName") or "default"
        meta = entry.pod.get("metadata") or {}
        token_spec: dict[str, Any] = {
            "expirationSeconds": int(source.get("expirationSeconds") or DEFAULT_TOKEN_EXPIRATION_SECONDS),
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta.get("name"), "uid": meta.get("uid")},
        }
        if source.get("audience"):
            token_spec["audiences"] = [source["audience"]]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": token_spec}
        try:
            answer = kube.Resource(self._client, kube.SERVICE_ACCOUNTS).create_subresource(
                service_account, "token", body, entry.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                raise VolumeError(
                    f'serviceaccount "{service_account}" not found in namespace {entry.namespace}'
                ) from None
            raise
        return answer["status"]["token"], int(answer["spec"]["expirationSeconds"])

    # --- the atomic writer --------------------------------------------------------------------------------

    def _write(self, entry: _Volume) -> None:
        files, refresh_at = self._files(entry)
        entry.refresh_at = refresh_at
        _write_atomically(entry.directory, files)


def _write_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """The kubelet's AtomicWriter: a new timestamped directory, then one rename of the `..data` symlink."""
    directory.mkdir(parents=True, exist_ok=True)
    data_link = directory / _DATA_LINK
    old = os.readlink(data_link) if data_link.is_symlink() else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()) + str(time.time_ns() % 1_000_000_000)
    new_dir = directory / stamp
    new_dir.mkdir(mode=0o755)
    for path, content in files.items():
        target = new_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    tmp_link = directory / "..data_tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp_link.unlink()
    tmp_link.symlink_to(stamp)
    os.replace(tmp_link, data_link)
    for path in files:
        top = path.split("/")[0]
        link = directory / top
        if not link.is_symlink():
            link.symlink_to(f"{_DATA_LINK}/{top}")
    for stale in os.listdir(directory):
        if stale.startswith("..") or stale in {p.split("/")[0] for p in files}:
            continue
        with contextlib.suppress(OSError):
            os.unlink(directory / stale)
    if old is not None and old != stamp:
        shutil.rmtree(directory / old, ignore_errors=True)


__all__ = ["Kubelet", "VolumeError"]
