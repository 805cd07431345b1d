"""Every component, started as deployed: a read-only root filesystem, no /tmp, only the manifest's volumes writable.

Each entry point runs in its own process under tests/read_only_root.py (an audit hook refuses writes outside the
declared volumes with EROFS; $TMPDIR names a path that does not exist, so tempfile has nowhere to go, as in the pod),
against in-memory clusters whose kubeconfigs carry certificate-authority-data, the case the official client's loader
writes to a temporary file.
"""

from __future__ import annotations

import base64
import errno
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from controller.source_clusters import SourceCluster, client_error_message
from kubemcsa.client import connect, kube
from kubemcsa.client.kubeconfig import ConfigError
from kubemcsa.contract import api
from kubemcsa.contract.credentials import Credentials, to_secret_data
from kubemcsa_testing.objects import create_or_get, create_pinned_credential
from kubemcsa_testing.wait import WaitTimeout, wait_for

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
LAUNCHER = Path(__file__).resolve().parent / "read_only_root.py"
SYSTEM_NS = api.SYSTEM_NAMESPACE


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(tmp_path: Path, entry_point: str, *args: str, writable: tuple[Path, ...] = ()) -> list[str]:
    flags = [part for path in writable for part in ("--writable", str(path))]
    return [sys.executable, str(LAUNCHER), *flags, entry_point, *args]


def environment(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TMPDIR=str(tmp_path / "no-such-tmp"),  # as in the pod: no /tmp to fall back on (the launcher checks it)
        HOME=str(tmp_path / "no-such-home"),
        KUBECONFIG=str(tmp_path / "no-such-kubeconfig"),
        PYTHONDONTWRITEBYTECODE="1",  # as in the image
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


def run(tmp_path: Path, entry_point: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(tmp_path, entry_point, *args),
        cwd=ROOT,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start(tmp_path: Path, entry_point: str, *args: str, writable: tuple[Path, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(tmp_path, entry_point, *args, writable=writable),
        cwd=ROOT,
        env=environment(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        output = process.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        output = process.communicate()[0]
    return output


def assert_clean(output: str) -> None:
    for symptom in ("Read-only file system", "No usable temporary directory", "read_only_root: not read-only"):
        assert symptom not in output, output


# --- the emulation itself -------------------------------------------------------------------------------------------


def test_the_launcher_leaves_no_temporary_directory_and_no_writable_path(tmp_path: Path) -> None:
    """What the deployed bug was: the official loader's temporary CA file fails, and here it fails the same way."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://c:1", "certificate-authority-data": "Zm9v"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    done = run(tmp_path, "read_only_root:official_loader", str(kubeconfig))
    assert done.returncode != 0
    assert "No usable temporary directory found" in done.stderr, done.stderr


def local_kubeconfig_with_ca_file(cluster: Any, tmp_path: Path) -> str:
    """The local cluster as the pod sees it in-cluster: the CA in a file (here relative to the kubeconfig)."""
    doc = cluster.kubeconfig()
    ca = doc["clusters"][0]["cluster"].pop("certificate-authority-data")
    (tmp_path / "local-ca.crt").write_bytes(base64.b64decode(ca))
    doc["clusters"][0]["cluster"]["certificate-authority"] = "local-ca.crt"
    (tmp_path / "local.kubeconfig").write_text(yaml.safe_dump(doc))
    return str(tmp_path / "local.kubeconfig")


# --- the controller, with each kind of source ------------------------------------------------------------------------


def test_controller_reaches_every_kind_of_source_without_a_writable_filesystem(
    cluster1: Any, cluster2: Any, tmp_path: Path
) -> None:
    admin1, admin2 = cluster1.admin_client(), cluster2.admin_client()
    for doc in documents(MANIFESTS / "crd" / "serviceaccountimports.yaml") + documents(MANIFESTS / "namespace.yaml"):
        create_or_get(admin1, doc)
    # Exported by its owner to every namespace of cluster1 (kubemcsa allow pod-lister --to 'cluster1/*').
    exported = {"labels": {api.EXPORTED_LABEL: "true"}, "annotations": {api.EXPORT_TO_ANNOTATION: "cluster1/*"}}
    create_or_get(
        admin2,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "pod-lister", "namespace": "default", **exported},
        },
    )
    creds = Credentials(server=cluster2.url, ca_crt=cluster2.ca_pem, token=cluster2.admin_token, namespace="default")
    # 1. --source-kubeconfig, as the controller Deployment's comment suggests (certificate-authority-data inside).
    sources = tmp_path / "sources" / "config"
    sources.parent.mkdir()
    cluster2.write_kubeconfig(str(sources), context="via-kubeconfig")
    # 2. a mounted import under --imports-dir.
    mounted = tmp_path / "imports" / "via-mount"
    mounted.mkdir(parents=True)
    for key, value in to_secret_data(creds, "via-mount").items():
        (mounted / key).write_bytes(base64.b64decode(value))
    # 3. a Secret in the system namespace, controlled by its import there, as `kubemcsa bootstrap` leaves them.
    spec = {"clusterName": "via-secret", "namespace": "default", "name": "pod-lister"}
    boot = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "via-secret"}, "spec": spec}
    boot = kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(boot, SYSTEM_NS)
    owner = {"apiVersion": api.API_VERSION, "kind": api.KIND, "name": "via-secret", "uid": boot["metadata"]["uid"]}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "via-secret-token",
            "namespace": SYSTEM_NS,
            "labels": {api.IMPORT_LABEL: "via-secret"},
            "ownerReferences": [{**owner, "controller": True}],
        },
        "data": to_secret_data(creds, "via-secret"),
    }
    create_pinned_credential(admin1, secret)
    local = local_kubeconfig_with_ca_file(cluster1, tmp_path)
    port = free_port()
    args = ["--kubeconfig", local, "--source-kubeconfig", str(sources), "--imports-dir", str(tmp_path / "imports")]
    args += ["--metrics-port", str(port), "--identity", "read-only", "--cluster-name", "cluster1"]
    process = start(tmp_path, "controller.__main__:main", *args)
    try:
        for cluster_name in ("via-kubeconfig", "via-mount", "via-secret"):
            body = {"clusterName": cluster_name, "namespace": "default", "name": "pod-lister"}
            obj = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": cluster_name}, "spec": body}
            kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).create(obj, "default")

        def conditions() -> dict[str, tuple[str, str]]:
            found = {}
            for item in kube.Resource(admin1, kube.SERVICE_ACCOUNT_IMPORTS).list("default")["items"]:
                for cond in (item.get("status") or {}).get("conditions") or []:
                    if cond["type"] == "Ready":
                        found[item["metadata"]["name"]] = (cond["status"], cond.get("message", ""))
            return found

        def all_ready() -> bool:
            assert process.poll() is None, "the controller exited"
            return len(conditions()) == 3 and all(status == "True" for status, _ in conditions().values())

        try:
            wait_for(all_ready, timeout=30, what="every import Ready")
        except WaitTimeout:
            raise AssertionError(f"not every import is Ready: {conditions()}") from None
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    finally:
        output = stop(process)
    assert process.returncode == 0, output
    assert_clean(output)


def test_a_local_filesystem_failure_is_reported_as_such_not_as_bad_configuration() -> None:
    source = SourceCluster("c2", "source kubeconfig", "https://c2", b"", "f", build=lambda: None)  # type: ignore[arg-type,return-value]
    refused = FileNotFoundError(2, "No usable temporary directory found in ['/tmp']")
    message = client_error_message(source, refused)
    assert "local filesystem" in message and "No usable temporary directory" in message
    assert "no fault of the source kubeconfig" in message and "fix that configuration" not in message
    bad = ConfigError("cluster 'x' in the source kubeconfig has certificate-authority-data that is not base64; fix it.")
    assert client_error_message(source, bad).endswith("not base64; fix it.")


# --- the webhook and the certificate job ---------------------------------------------------------------------------


def webhook_cluster(cluster: Any) -> None:
    admin = cluster.admin_client()
    for doc in documents(MANIFESTS / "crd" / "serviceaccountimports.yaml") + documents(MANIFESTS / "namespace.yaml"):
        create_or_get(admin, doc)
    for doc in documents(MANIFESTS / "webhook" / "mutatingwebhookconfiguration.yaml"):
        create_or_get(admin, doc)


def test_webhook_manages_its_certificates_writing_only_its_declared_volume(cluster1: Any, tmp_path: Path) -> None:
    webhook_cluster(cluster1)
    local = cluster1.write_kubeconfig(str(tmp_path / "local.kubeconfig"))
    cert_dir = tmp_path / "webhook-tls"  # the Deployment's memory-backed emptyDir
    cert_dir.mkdir()
    port, health_port = free_port(), free_port()
    args = ["--host", "127.0.0.1", "--port", str(port), "--kubeconfig", local, "--manage-certificates"]
    args += ["--health-port", str(health_port)]  # a free one: the default (8080) may be taken on a shared machine
    args += ["--cert-dir", str(cert_dir), "--namespace", SYSTEM_NS, "--shutdown-delay", "0"]
    process = start(tmp_path, "webhook.__main__:main", *args, writable=(cert_dir,))
    try:

        def ready() -> bool:
            assert process.poll() is None, "the webhook exited"
            try:
                with httpx.Client(verify=False) as client:  # the certificate names the Service, not 127.0.0.1
                    served = client.get(f"https://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                    return served and client.get(f"http://127.0.0.1:{health_port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="the webhook to serve")
    finally:
        output = stop(process)
    assert process.returncode == 0, output
    assert_clean(output)
    assert (cert_dir / "tls.crt").is_file()


def test_certificate_job_runs_with_nothing_writable(cluster1: Any, tmp_path: Path) -> None:
    webhook_cluster(cluster1)
    local = cluster1.write_kubeconfig(str(tmp_path / "local.kubeconfig"))
    job = documents(MANIFESTS / "certs" / "job.yaml")[0]["spec"]["template"]["spec"]
    assert "volumes" not in job  # the Job declares nothing writable
    args = [arg for arg in job["containers"][0]["command"] if arg.startswith("--")]
    done = run(tmp_path, "certs.__main__:main", *args, "--kubeconfig", local)
    assert done.returncode == 0, done.stderr
    assert_clean(done.stdout + done.stderr)


# --- the kubemcsa CLI ----------------------------------------------------------------------------------------------


def test_kubemcsa_bootstrap_export_and_status_run_with_nothing_writable(
    cluster1: Any, cluster2: Any, tmp_path: Path
) -> None:
    for doc in documents(MANIFESTS / "crd" / "serviceaccountimports.yaml"):
        create_or_get(cluster1.admin_client(), doc)
    create_or_get(
        cluster2.admin_client(),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pod-lister", "namespace": "default"}},
    )
    target = cluster1.write_kubeconfig(str(tmp_path / "cluster1.yaml"), context="cluster1")
    source = cluster2.write_kubeconfig(str(tmp_path / "cluster2.yaml"), context="cluster2")
    boot = ["bootstrap", "--target-context", "cluster1", "--target-kubeconfig", target]
    boot += ["--source-context", "cluster2", "--source-kubeconfig", source]
    done = run(tmp_path, "kubemcsa.cli:main", *boot)
    assert done.returncode == 0, done.stderr
    assert_clean(done.stdout + done.stderr)

    done = run(tmp_path, "kubemcsa.cli:main", "export", "pod-lister", "--kubeconfig", source, "-n", "default")
    assert done.returncode == 0, done.stderr
    assert "kind: Secret" in done.stdout
    assert_clean(done.stderr)

    done = run(tmp_path, "kubemcsa.cli:main", "status", "--kubeconfig", target, "-A")
    # No controller runs here, so the bootstrap import is not Ready yet (exit 1); what matters is that it is listed.
    assert done.returncode in (0, 1), done.stderr
    assert "cluster2" in done.stdout and "error:" not in done.stderr
    assert_clean(done.stdout + done.stderr)


@pytest.mark.parametrize("entry_point", ["controller.__main__:main", "webhook.__main__:main", "certs.__main__:main"])
def test_a_component_without_any_cluster_configuration_says_what_to_do(entry_point: str, tmp_path: Path) -> None:
    """No kubeconfig and not in a pod: the message points at the configuration, and nothing about the filesystem."""
    args = {
        "controller.__main__:main": [],
        "webhook.__main__:main": ["--manage-certificates", "--cert-dir", str(tmp_path)],
        "certs.__main__:main": ["--namespace=n", "--secret=s", "--service=s", "--webhook-configuration=w"],
    }[entry_point]
    done = run(tmp_path, entry_point, *args)
    assert done.returncode != 0
    assert "--kubeconfig" in done.stderr
    assert_clean(done.stderr)


def test_kubemcsa_demo_on_a_read_only_root_blames_the_filesystem_not_the_network(tmp_path: Path) -> None:
    done = run(tmp_path, "kubemcsa.cli:main", "demo")
    assert done.returncode == 2
    assert "a file on this machine could not be used (No usable temporary directory found" in done.stderr
    assert "set TMPDIR to a writable directory" in done.stderr and "cannot reach" not in done.stderr


@pytest.mark.parametrize(
    ("error", "local"),
    [
        (FileNotFoundError(2, "No usable temporary directory found in ['/tmp']"), True),
        (OSError(errno.EROFS, "Read-only file system", "/tmp/x"), True),
        (PermissionError(13, "Permission denied", "/etc/kubemcsa/ca.crt"), True),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (socket.gaierror(-2, "Name or service not known"), False),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), False),
    ],
)
def test_local_file_errors_are_told_apart_from_network_errors(error: OSError, local: bool) -> None:
    assert (connect.local_file_problem(error) is not None) == local


def test_a_component_failing_on_a_local_file_says_so() -> None:
    refused = OSError(errno.EROFS, "Read-only file system", "/tmp/x")
    assert connect.local_client_problem(refused).startswith("a file on this machine could not be used (Read-only")
    assert "--kubeconfig" in connect.local_client_problem(ValueError("no kubeconfig found at /nope"))
