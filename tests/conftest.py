from __future__ import annotations

from pathlib import Path

import pytest

from kubemcsa_testing.server import ApiServer

pytest_plugins = ["kubemcsa_testing.pytest_plugin"]


@pytest.fixture
def kubeconfig_paths(cluster1: ApiServer, cluster2: ApiServer, tmp_path: Path) -> dict[str, Path]:
    """An admin kubeconfig file per cluster, keyed by cluster name, each with a context of that name."""
    paths = {}
    for server in (cluster1, cluster2):
        paths[server.name] = tmp_path / f"{server.name}.yaml"
        server.write_kubeconfig(str(paths[server.name]), context=server.name)
    return paths
