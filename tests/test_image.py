"""The container image carries only what production runs, under the project's own image name.

No container runtime is needed: the build context is assembled as Docker assembles it (.dockerignore, then the build
stage's COPY lines), installed as the Dockerfile installs it (`pip install .`, no extras), and the result is checked:
no in-memory API server, no test-only dependency, and every production module imports with those made unavailable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "multicluster-service-account"
# Only the in-memory API server and the tests use these; the `test` extra installs them.
TEST_ONLY = ("kubemcsa_testing", "jsonpatch", "jsonpointer", "pytest", "_pytest", "httpx", "hypothesis")


def stages() -> list[list[str]]:
    """The Dockerfile's instructions, one list per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


def dockerignore_patterns() -> list[re.Pattern[str]]:
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not emulated here"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex + "$"))
    return patterns


def ignored(relative: str, patterns: list[re.Pattern[str]]) -> bool:
    """As Docker: a path is left out if it, or a directory above it, matches a pattern."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(pattern.match(prefix) for pattern in patterns for prefix in prefixes)


def build_context(target: Path) -> None:
    """The files the build stage's COPY instructions put in its WORKDIR, from the context .dockerignore leaves."""
    patterns = dockerignore_patterns()
    (build,) = [stage for stage in stages() if " AS build" in stage[0]]
    for instruction in build:
        if not instruction.startswith("COPY "):
            continue
        *sources, destination = instruction.split()[1:]
        assert not any(s.startswith("--") for s in sources)
        for source in sources:
            into = target / destination / source if destination.endswith("/") else target / destination
            origin = ROOT / source
            files = [origin] if origin.is_file() else [p for p in origin.rglob("*") if p.is_file()]
            for path in files:
                relative = path.relative_to(ROOT).as_posix()
                if ignored(relative, patterns):
                    continue
                copy = into / path.relative_to(origin) if origin.is_dir() else into
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy)


def test_dockerignore_leaves_out_the_in_memory_api_server_and_the_tests() -> None:
    patterns = dockerignore_patterns()
    assert ignored("kubemcsa_testing/server.py", patterns)
    assert ignored("tests/test_image.py", patterns) and ignored("controller/__pycache__/run.cpython-312.pyc", patterns)
    assert not ignored("kubemcsa/client/kube.py", patterns)


def test_final_stage_copies_only_the_virtual_environment() -> None:
    build, final = stages()
    assert build[0].split()[1] == final[0].split()[1], "both stages need the same interpreter at the same path"
    copies = [line for line in final if line.startswith(("COPY", "ADD"))]
    assert copies == ["COPY --from=build /opt/venv /opt/venv"]
    assert "USER 65532:65532" in final
    (install,) = [line for line in build if " install " in line and line.startswith("RUN")]
    assert re.search(r"pip --python /opt/venv/bin/python install --no-compile \.( |$)", install), install
    assert "[" not in install, "no extras in the image"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the build stage installs into the venv, installed the same way into a directory."""
    context = tmp_path_factory.mktemp("context")
    build_context(context)
    target = tmp_path_factory.mktemp("site-packages")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile"]
    subprocess.run(
        [*pip, "--target", str(target), str(context)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return target


def test_the_installed_package_has_no_in_memory_api_server_nor_test_dependency(installed: Path) -> None:
    assert (installed / "kubemcsa" / "client" / "kube.py").is_file()
    assert not (installed / "kubemcsa_testing").exists() and not (installed / "kubemcsa" / "testing").exists()
    assert not (installed / "tests").exists() and not (installed / "bench").exists()
    (metadata,) = installed.glob("*.dist-info/METADATA")
    lines = metadata.read_text().splitlines()
    required = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    unconditional = {re.split(r"[<>=!~ ;\[]", spec)[0].lower() for spec in required if "extra ==" not in spec}
    product = {"fastapi", "uvicorn", "kubernetes", "cryptography", "prometheus-client", "pyyaml", "urllib3", "orjson"}
    assert unconditional == product


def test_every_production_module_imports_without_the_test_only_packages(installed: Path) -> None:
    script = textwrap.dedent(
        f"""
        import importlib, io, pkgutil, sys
        from contextlib import redirect_stderr

        BLOCKED = {TEST_ONLY!r}

        class Unavailable:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Unavailable())
        root = {str(installed)!r}
        for package in ("kubemcsa", "controller", "webhook", "certs"):
            module = importlib.import_module(package)
            assert module.__file__.startswith(root), module.__file__
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                if info.name != "kubemcsa_testing.demo":  # the demo needs the in-memory API server; see below
                    importlib.import_module(info.name)
        from kubemcsa import cli
        err = io.StringIO()
        with redirect_stderr(err):
            assert cli.main(["demo"]) == cli.EXIT_ERROR
        print(err.getvalue())
        """
    )
    env = dict(os.environ, PYTHONPATH=str(installed), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=installed, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "the demo needs the in-memory API server" in done.stdout and "install the demo extra" in done.stdout


def test_the_demo_needs_only_the_declared_dependencies_and_its_extra() -> None:
    """`pip install '.[demo]'` then `kubemcsa demo`: everything the demo imports (the in-memory API server, the
    controller, the webhook) comes from the package's dependencies or the `demo` extra, none from `test`. Checked
    in a fresh interpreter from the distribution metadata, without a new virtual environment (by hand:
    python3 -m venv v && v/bin/pip install '.[demo]' && v/bin/kubemcsa demo)."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, re, sys
        from importlib import metadata

        import kubemcsa_testing.demo, kubemcsa_testing, controller.run, webhook.__main__, kubemcsa.cli.federate
        for info in pkgutil.walk_packages(kubemcsa_testing.__path__, "kubemcsa_testing."):
            if info.name != "kubemcsa_testing.pytest_plugin":  # for test suites, not the demo
                importlib.import_module(info.name)

        def requirements(dist, extra=None):
            for spec in metadata.requires(dist) or []:
                name, _, marker = spec.partition(";")
                wanted = f'extra == "{extra}"' in marker if extra else "extra ==" not in marker
                if wanted:
                    yield re.split(r"[<>=!~ \\[(]", name.strip())[0].lower().replace("_", "-")

        allowed, todo = set(), [*requirements("multicluster-service-account"),
                                *requirements("multicluster-service-account", "demo")]
        while todo:
            name = todo.pop()
            if name not in allowed:
                allowed.add(name)
                try:
                    todo.extend(requirements(name))
                except metadata.PackageNotFoundError:
                    pass
        owners = metadata.packages_distributions()
        ours = {"kubemcsa", "kubemcsa_testing", "controller", "webhook", "certs"}
        used = set()
        for module in list(sys.modules):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ours or top.startswith("_"):
                continue
            for dist in owners.get(top, []):  # none: a module no distribution installs (cython_runtime)
                used.add(dist.lower().replace("_", "-"))
        print(sorted(used - allowed))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"imported, yet declared by no dependency nor the demo extra: {done.stdout}"


# --- one image name of the project's own -----------------------------------------------------------------------------


def test_one_image_name_of_the_projects_own_everywhere() -> None:
    kustomization = yaml.safe_load((ROOT / "manifests" / "kustomization.yaml").read_text())
    assert kustomization["images"] == [{"name": IMAGE, "newTag": "0.6.0"}]
    images = set()
    for path in (ROOT / "manifests").rglob("*.yaml"):
        images |= set(re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.MULTILINE))
    assert images == {f"{IMAGE}:0.6.0"}
    assert f"docker build -t {IMAGE}:0.6.0 ." in (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert f"kustomize edit set image {IMAGE}=" in readme
    original = "admiraltyio" + "/multicluster-service-account"  # split, so that a grep finds only the README
    for path in [ROOT / "Dockerfile", ROOT / "pyproject.toml", *ROOT.glob("manifests/**/*.yaml")]:
        assert original not in path.read_text(), path
    credit = f"[Admiralty's multicluster-service-account](https://github.com/{original})"
    assert [line for line in readme.splitlines() if original in line] == [
        line for line in readme.splitlines() if credit in line
    ], "the README names the original only to credit it"
