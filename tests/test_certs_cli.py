"""`python -m certs`: one-shot setup against the in-memory API server; what it prints and how it fails."""

import base64
import subprocess
import sys

import pytest

from certs.__main__ import main
from kubemcsa.client import kube

NAMESPACE = "multicluster-service-account"
ARGV = [
    "--namespace",
    NAMESPACE,
    "--secret",
    "webhook-cert",
    "--service",
    "webhook",
    "--webhook-configuration",
    "webhook",
]


@pytest.fixture
def kubeconfig(cluster1, tmp_path):
    client = cluster1.admin_client()
    kube.Resource(client, kube.NAMESPACES).create(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    )
    kube.Resource(client, kube.MUTATING_WEBHOOK_CONFIGURATIONS).create(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "webhook"},
            "webhooks": [
                {
                    "name": "webhook.example.com",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "clientConfig": {"service": {"name": "webhook", "namespace": NAMESPACE}},
                }
            ],
        }
    )
    path = tmp_path / "kubeconfig"
    cluster1.write_kubeconfig(str(path))
    return str(path)


def test_one_shot_setup_then_nothing_to_do(kubeconfig, cluster1, tmp_path, capsys):
    assert main([*ARGV, "--kubeconfig", kubeconfig, "--write-dir", str(tmp_path / "tls")]) == 0
    out = capsys.readouterr()
    assert "created a new CA" in out.out and "issued a new serving certificate" in out.out
    assert f"wrote Secret {NAMESPACE}/webhook-cert" in out.out
    assert "set the caBundle of 1 webhook(s)" in out.out
    assert "valid until" in out.out
    assert "PRIVATE" not in out.out + out.err
    assert (tmp_path / "tls" / "tls.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    secret = kube.Resource(cluster1.admin_client(), kube.SECRETS).get("webhook-cert", NAMESPACE)
    assert base64.b64decode(secret["data"]["tls.crt"]) == (tmp_path / "tls" / "tls.crt").read_bytes()

    assert main([*ARGV, "--kubeconfig", kubeconfig]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_missing_webhook_configuration_fails_in_one_sentence(kubeconfig, capsys):
    argv = [*ARGV[:-1], "nope", "--kubeconfig", kubeconfig]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MutatingWebhookConfiguration nope not found")
    assert err.count("\n") == 1


def test_an_unusable_kubeconfig_fails_in_one_sentence(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main([*ARGV, "--kubeconfig", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "pass --kubeconfig" in err and err.count("\n") == 1


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--namespace", NAMESPACE])
    assert info.value.code == 2


def test_runs_as_a_module(kubeconfig):
    result = subprocess.run(
        [sys.executable, "-m", "certs", *ARGV, "--kubeconfig", kubeconfig],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "valid until" in result.stdout
