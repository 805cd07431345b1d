"""Which package may import which: shared code (kubemcsa/) never depends on a component, and no product module
depends on the in-memory API server. Run it alone with: python -m pytest tests/test_import_boundaries.py"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("controller", "webhook", "certs")
PRODUCT = ("kubemcsa", *COMPONENTS)
# The demo runs the whole product on in-memory clusters: it is the one module allowed to reach everything.
DEMO = ROOT / "kubemcsa_testing" / "demo.py"


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


def product_files() -> list[Path]:
    return [p for package in PRODUCT for p in (ROOT / package).rglob("*.py")]


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_shared_code_never_imports_a_component() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "kubemcsa").rglob("*.py")
        if path != DEMO
        for module in imported_modules(path)
        if any(is_under(module, component) for component in COMPONENTS)
    ]
    assert offenders == []


def test_no_product_module_imports_the_in_memory_server() -> None:
    testing = ROOT / "kubemcsa" / "testing"
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in product_files()
        if path != DEMO and testing not in path.parents
        for module in imported_modules(path)
        if is_under(module, "kubemcsa_testing")
    ]
    assert offenders == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from controller.run import Controller\n    import kubemcsa_testing.server\n")
    assert {"controller.run", "kubemcsa_testing.server"} <= imported_modules(sample)
