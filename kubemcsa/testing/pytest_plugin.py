"""pytest fixtures that start in-memory clusters: `api_server_factory`, `cluster1`, `cluster2`.

Load with `pytest_plugins = ["kubemcsa.testing.pytest_plugin"]` in a conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kubemcsa.testing.server import ApiServer


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


@pytest.fixture
def cluster1(api_server_factory: Callable[..., ApiServer]) -> ApiServer:
    return api_server_factory(name="cluster1")


@pytest.fixture
def cluster2(api_server_factory: Callable[..., ApiServer]) -> ApiServer:
    return api_server_factory(name="cluster2")
