"""The command line itself: help with examples everywhere, usage errors, one-sentence failures, console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubemcsa import cli

COMMANDS = ["bootstrap", "export", "status", "demo"]


@pytest.mark.parametrize("argv", [[], *[[c] for c in COMMANDS]])
def test_every_help_has_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "kubemcsa " in out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_status_and_export_flags_conflict_or_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["status", "-A", "-n", "x"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bootstrap", "--target-context", "a"])
    assert "--source-context" in capsys.readouterr().err


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


def test_missing_kubeconfig_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["status", "--kubeconfig", str(tmp_path / "nope")])
    assert code == cli.EXIT_ERROR
    line = one_error_line(capsys)
    assert line.startswith("kubemcsa status: error: no kubeconfig found at")


def test_unknown_context_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kc").write_text("contexts: []\ncurrent-context: x\n")
    code = cli.main(
        [
            "bootstrap",
            "--target-context",
            "c1",
            "--source-context",
            "c2",
            "--target-kubeconfig",
            str(tmp_path / "kc"),
            "--source-kubeconfig",
            str(tmp_path / "kc"),
        ]
    )
    assert code == cli.EXIT_ERROR
    assert "context 'c2' is not in the kubeconfig" in one_error_line(capsys)


def test_bad_duration_is_one_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "x", "--duration", "soon"]) == cli.EXIT_ERROR
    assert "--duration 'soon' is not a duration" in one_error_line(capsys)


def test_an_invalid_export_name_is_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", "x", "--as", "Not_Valid"]) == cli.EXIT_ERROR
    assert "--as 'Not_Valid' is not a valid Secret name" in one_error_line(capsys)


def test_unreachable_server_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (tmp_path / "kc").write_text(
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority: ca.pem}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    code = cli.main(["export", "sa", "--kubeconfig", str(tmp_path / "kc")])
    assert code == cli.EXIT_ERROR
    assert f"cannot reach cluster 'c' (context 'x') at https://127.0.0.1:{port}" in one_error_line(capsys)


def test_console_scripts_run(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "kubemcsa"
    assert script.exists(), "install the project (pip install -e .) to get the kubemcsa console script"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "bootstrap" in done.stdout
    done = subprocess.run(
        [str(script), "status", "--kubeconfig", str(tmp_path / "nope")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == cli.EXIT_ERROR
    assert done.stderr.startswith("kubemcsa status: error:")
    kubectl = shutil.which("kubectl", path=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    if kubectl:  # kubectl finds the plugin kubectl-mcsa on PATH
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run([kubectl, "mcsa", "--help"], capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert "kubectl mcsa" in done.stdout
