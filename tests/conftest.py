"""Shared fixtures: a real nats-server per test, real PostgreSQL on demand."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.stack import SecuredNats, secured_nats_server
from tests.support.postgres import PostgresCluster, PostgresUnavailable


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip_root = pytest.mark.skip(reason="needs root (network namespaces, TUN, wireguard-go)")
        for item in items:
            if "root" in item.keywords:
                item.add_marker(skip_root)


# a real nats-server with JetStream, fresh store, and wgmfa's authentication: services
# started through tests.support.stack run with their own roles; `url` logs in as the
# test harness, which may play any part
running_nats = secured_nats_server


@pytest.fixture
def nats_server() -> Iterator[SecuredNats]:
    with running_nats() as server:
        yield server


@pytest.fixture(scope="module")
def nats_for_module() -> Iterator[SecuredNats]:
    """One server for all the tests of a module that share one running system."""
    with running_nats() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: SecuredNats) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session; each test takes a new database."""
    directory = Path(tempfile.mkdtemp(prefix="wgmfa-pg-"))
    try:
        cluster = PostgresCluster(directory)
        cluster.start()
    except PostgresUnavailable as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(str(exc))
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


_databases = itertools.count(1)


def new_database_url(kind: str, request: pytest.FixtureRequest, directory: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{directory / 'core.db'}"
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"wgmfa_{os.getpid()}_{next(_databases)}")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite and on PostgreSQL."""
    return new_database_url(request.param, request, tmp_path)
