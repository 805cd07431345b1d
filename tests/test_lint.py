"""ruff is part of the suite, so the one test command also keeps the code base clean."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed; install the test extras: pip install -e '.[test]'")
    return []


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    result = subprocess.run([*_ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_version_is_supported():
    assert sys.version_info >= (3, 11)
