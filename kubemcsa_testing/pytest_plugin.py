"""pytest fixtures for clusters: `api_server_factory`, `cluster1`, `cluster2`, `tier`, `real_control_planes`.

Load with `pytest_plugins = ["kubemcsa_testing.pytest_plugin"]` in a conftest.py.

Two tiers. The in-memory one (kubemcsa_testing.ApiServer) always runs: fresh servers for each test. The real one
runs when KUBEBUILDER_ASSETS names an envtest asset folder (kube-apiserver, etcd, optionally
kube-controller-manager): two real control planes, started once per session (cluster2 with `--authentication-config`,
ready to trust cluster1's service-account tokens as `kubemcsa federate` sets it up),
reset to their first state before each test that uses them. A test marked `@pytest.mark.real_tier` is run on both
tiers through its `tier` parameter (`cluster1`/`cluster2` follow it); without the asset folder its real variant is
not generated, and the session ends with one line saying how to run it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kubemcsa_testing import crd_manifest
from kubemcsa_testing.controlplane import ControlPlane, assets_folder, missing_assets_reason, no_jwt_issuers
from kubemcsa_testing.server import ApiServer

MEMORY = "memory"
REAL = "real"
MARKER = "real_tier"
_state: dict[str, Any] = {"marked": 0}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: runs on the in-memory API server and, with KUBEBUILDER_ASSETS, on real control planes"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "tier" not in metafunc.fixturenames:
        return
    marked = metafunc.definition.get_closest_marker(MARKER) is not None
    # Unmarked tests get the memory tier as an explicit parameter too: a module-scoped environment is then keyed by
    # tier, so an unmarked test never reuses the real tier's environment built for its marked neighbours.
    tiers = [MEMORY, REAL] if marked and assets_folder() is not None else [MEMORY]
    # Module scope: a module-scoped environment is built once per tier, and a module's tests are grouped by tier.
    metafunc.parametrize("tier", tiers, scope="module")


def pytest_collection_finish(session: pytest.Session) -> None:
    # After -k/-m deselection: the cases this run really has.
    _state["marked"] = sum(1 for item in session.items if item.get_closest_marker(MARKER) is not None)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if assets_folder() is None and _state["marked"]:
        terminalreporter.write_line(f"{missing_assets_reason()} ({_state['marked']} cases ran in memory only)")


@pytest.fixture(scope="session")
def tier() -> str:
    """The tier of a test that is not marked real_tier: in memory."""
    return MEMORY


@pytest.fixture
def api_server_factory() -> Iterator[Callable[..., ApiServer]]:
    """`api_server_factory(name="c1", max_token_expiration_seconds=None)`: a started ApiServer, stopped after."""
    servers: list[ApiServer] = []

    def make(name: str = "cluster", **kwargs: Any) -> ApiServer:
        server = ApiServer(name=name, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.stop()


def start_real_control_planes(assets: Path, workdir: Path) -> tuple[ControlPlane, ControlPlane]:
    """cluster1 and cluster2 started side by side. cluster2 runs with `--authentication-config`, trusting no
    issuer yet: a test makes it trust cluster1 as an administrator does, with what `kubemcsa federate` prints
    (`configure_authentication` rewrites the file and waits until kube-apiserver has reloaded it)."""
    c1 = ControlPlane("cluster1", assets, workdir / "cluster1")
    c2 = ControlPlane("cluster2", assets, workdir / "cluster2", authentication_config=no_jwt_issuers())
    planes = (c1, c2)
    try:
        for plane in planes:
            plane.start()
        # The project's CRD is there from the start, as on a cluster where it is installed, and before
        # kube-controller-manager starts: its garbage collector learns of a resource type added later only every
        # 30 s, which would leave an import's Secrets uncollected that long.
        from kubemcsa_testing.objects import create_or_get

        # In this thread, not a pool's: a child started from a thread is killed when that thread ends (PDEATHSIG).
        for plane in planes:
            plane.wait_ready(after_ready=lambda plane=plane: create_or_get(plane.admin_client(), crd_manifest()))
        for plane in planes:
            plane.snapshot_baseline()
    except BaseException:
        for plane in reversed(planes):
            plane.stop()
        raise
    return c1, c2


@pytest.fixture(scope="session")
def real_control_planes() -> Iterator[tuple[ControlPlane, ControlPlane]]:
    """The session's two real control planes (started on first use; skipped without KUBEBUILDER_ASSETS)."""
    assets = assets_folder()
    if assets is None:
        pytest.skip(missing_assets_reason())
    with tempfile.TemporaryDirectory(prefix="kubemcsa-real-") as workdir:
        planes = start_real_control_planes(assets, Path(workdir))
        try:
            yield planes
        finally:
            with ThreadPoolExecutor(2) as pool:  # both at once
                for future in [pool.submit(plane.stop) for plane in planes]:
                    future.result()


def fresh_real_clusters(request: pytest.FixtureRequest) -> tuple[ControlPlane, ControlPlane]:
    """The session's real control planes, reset to their first state (both at once)."""
    planes: tuple[ControlPlane, ControlPlane] = request.getfixturevalue("real_control_planes")
    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(plane.reset) for plane in planes]:
            future.result()
    return planes


@pytest.fixture
def clusters(tier: str, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    """(cluster1, cluster2) of the test's tier: fresh in-memory servers, or the real ones reset."""
    if tier == REAL:
        return fresh_real_clusters(request)
    factory = request.getfixturevalue("api_server_factory")
    return factory(name="cluster1"), factory(name="cluster2")


@pytest.fixture
def cluster1(tier: str, request: pytest.FixtureRequest) -> Any:
    if tier == REAL:
        return request.getfixturevalue("clusters")[0]
    return request.getfixturevalue("api_server_factory")(name="cluster1")


@pytest.fixture
def cluster2(tier: str, request: pytest.FixtureRequest) -> Any:
    if tier == REAL:
        return request.getfixturevalue("clusters")[1]
    return request.getfixturevalue("api_server_factory")(name="cluster2")
