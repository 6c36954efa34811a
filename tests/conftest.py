"""Shared fixtures: a background loop for real servers, and a per-test server set."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import LoopThread, Servers


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def servers(loop_thread: LoopThread) -> Iterator[Servers]:
    s = Servers(loop_thread)
    yield s
    s.close()


from tests.dbfixtures import (  # noqa: E402, F401
    backend_fixture,
    db_fixture,
    empty_db_url_fixture,
    pg_server_fixture,
)
from tests.infra.fixtures import isolated_stub  # noqa: E402, F401
from tests.redisfixtures import private_redis_fixture, redis_url_fixture  # noqa: E402, F401
