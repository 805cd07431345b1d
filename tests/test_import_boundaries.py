"""The architecture, as import contracts: which package may import which. Each test is one contract; a failure
names the file and the import that breaks it. Run them alone with: python -m pytest tests/test_import_boundaries.py

The layers, bottom to top:
- `kubemcsa.contract`: the user-facing contract (names, spec, the import Secret and kubeconfig, export policy,
  federated-source records, Argo CD's format). Pure data and functions.
- `kubemcsa.client`: the Kubernetes client layer (API access, kubeconfigs, token requests, trust checks, TLS).
- `kubemcsa.certificates`: the webhook's certificate lifecycle, shared by the webhook and the certificate job.
- `kubemcsa.config`: the client helpers users import; `kubemcsa.cli`: the `kubemcsa` command, one module a command.
- The components, `controller`, `webhook` and `certs`, each on top of `kubemcsa` and independent of each other.
- `kubemcsa_testing`: the in-memory API server (and the demo that runs everything on it), which no product code
  imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("controller", "webhook", "certs")
PRODUCT = ("kubemcsa", *COMPONENTS)
IN_MEMORY = "kubemcsa_testing"
# The demo runs the whole product on in-memory clusters: the one in-memory module that reaches a component.
DEMO = ROOT / IN_MEMORY / "demo.py"
# Decisions: data in, data out. No client, no thread, no clock, no socket, no web framework.
IMPURE = ("kubernetes", "threading", "time", "socket", "fastapi", "uvicorn", "urllib3", "httpx", "asyncio")
PURE_MODULES = (
    "kubemcsa/contract/*.py",
    "controller/model.py",
    "controller/assess.py",
    "controller/plan.py",
    "controller/conditions.py",
    "controller/outputs/__init__.py",
    "controller/outputs/base.py",
    "controller/outputs/argocd.py",
    "controller/outputs/clusterprofile.py",
    "webhook/mutation.py",
    "webhook/review.py",
    "kubemcsa/certificates/plan.py",
)
# Lower layers of kubemcsa never import higher ones (contract < client < certificates < config, cli).
LAYERS = ("kubemcsa.contract", "kubemcsa.client", "kubemcsa.certificates", "kubemcsa.config", "kubemcsa.cli")


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (imports inside functions count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def files(*patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def product_files() -> list[Path]:
    return [p for package in PRODUCT for p in (ROOT / package).rglob("*.py")]


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in paths
        for module in sorted(imported_modules(path))
        if any(is_under(module, package) for package in forbidden)
    ]


def module_of(path: Path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_shared_code_never_imports_a_component() -> None:
    assert offenders(list((ROOT / "kubemcsa").rglob("*.py")), COMPONENTS) == []


@pytest.mark.parametrize("component", COMPONENTS)
def test_the_components_are_independent_of_each_other(component: str) -> None:
    others = tuple(c for c in COMPONENTS if c != component)
    assert offenders(list((ROOT / component).rglob("*.py")), others) == []


def test_no_component_imports_the_command_line() -> None:
    """kubemcsa.cli is a top: what a component needs of it belongs in the contract or the client layer."""
    assert offenders([p for c in COMPONENTS for p in (ROOT / c).rglob("*.py")], ("kubemcsa.cli",)) == []


def test_no_product_module_imports_the_in_memory_server() -> None:
    assert offenders(product_files(), (IN_MEMORY,)) == []


def test_the_in_memory_server_imports_no_component_but_in_its_demo() -> None:
    paths = [p for p in (ROOT / IN_MEMORY).rglob("*.py") if p != DEMO]
    assert offenders(paths, COMPONENTS) == []


def test_kubemcsa_layers_import_only_downwards() -> None:
    found = []
    for index, layer in enumerate(LAYERS):
        paths = [p for p in (ROOT / "kubemcsa").rglob("*.py") if is_under(module_of(p), layer)]
        found += offenders(paths, LAYERS[index + 1 :])
    assert found == []


def test_decisions_are_pure() -> None:
    paths = files(*PURE_MODULES)
    assert len(paths) >= 12, "the pure modules moved: update PURE_MODULES"
    assert offenders(paths, IMPURE) == []


def test_the_controller_runtime_is_generic() -> None:
    """controller/runtime knows nothing of imports: it could run any controller."""
    paths = list((ROOT / "controller" / "runtime").rglob("*.py"))
    found = offenders(paths, ("controller", "webhook", "certs"))
    assert [line for line in found if not line.split(" imports ")[1].startswith("controller.runtime")] == []


def test_benchmarks_and_tests_import_no_test_module() -> None:
    """Shared test code lives in kubemcsa_testing or conftest.py, never in a test module another one imports."""
    paths = files("tests/*.py", "bench/*.py")
    test_modules = tuple(p.stem for p in files("tests/test_*.py"))
    assert offenders(paths, test_modules) == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from controller.run import Controller\n    import kubemcsa_testing.server\n")
    assert {"controller.run", "kubemcsa_testing.server"} <= imported_modules(sample)
