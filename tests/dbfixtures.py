"""Database fixtures: a migrated `Database` on SQLite and on a throw-away PostgreSQL database.

PostgreSQL: `LMGATE_TEST_PG` (default postgresql://postgres@127.0.0.1:5432/test) is the
server; each test session creates `lmgate_test_<random>_<n>` databases and drops them at the
end. Unreachable server: skip, or fail when CI=true. Import the `*_fixture` functions into a
conftest (or a test module); the fixtures are named `db`, `empty_db_url`, `backend`, `pg_server`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from itertools import count
from pathlib import Path

import asyncpg
import pytest

from lmgate.storage.db import Database

PG_ADMIN_URL = os.environ.get("LMGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


class PgServer:
    """Creates empty or migrated databases on the test server; drops them all at the end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        self.stem = f"lmgate_test_{secrets.token_hex(4)}"
        self.template: str | None = None
        self.created: list[str] = []
        self._n = count()

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self, migrated: bool = False) -> str:
        """A new database's SQLAlchemy URL: empty, or copied from a migrated template."""
        if migrated and self.template is None:
            self.template = await self.create()
            db = Database(self.url(self.template))
            await db.upgrade()
            await db.close()
        name = f"{self.stem}_{next(self._n)}"
        template = f" TEMPLATE {self.template}" if migrated else ""
        await self._admin(f"CREATE DATABASE {name}{template}")
        self.created.append(name)
        return name

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    async def drop_all(self) -> None:
        for name in reversed(self.created):
            await self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session", name="pg_server")
def pg_server_fixture() -> Iterator[PgServer]:
    """The PostgreSQL test server (skipped if unreachable, unless CI=true)."""
    server = PgServer(PG_ADMIN_URL)
    try:
        asyncio.run(server._admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as e:
        message = f"PostgreSQL at {PG_ADMIN_URL} is unreachable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield server
    asyncio.run(server.drop_all())


@pytest.fixture(params=BACKENDS, name="backend")
def backend_fixture(request: pytest.FixtureRequest) -> PgServer | None:
    """None for SQLite, else the PostgreSQL server (resolved outside any event loop)."""
    if request.param == "sqlite":
        return None
    server: PgServer = request.getfixturevalue("pg_server")
    return server


@pytest.fixture(name="empty_db_url")
async def empty_db_url_fixture(backend: PgServer | None, tmp_path: Path) -> str:
    """The URL of a new, empty (unmigrated) database of each backend."""
    if backend is None:
        return f"sqlite+aiosqlite:///{tmp_path}/empty.db"
    return backend.url(await backend.create())


@pytest.fixture(name="db")
async def db_fixture(backend: PgServer | None, tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated database, new for each test, on SQLite and on PostgreSQL."""
    if backend is None:
        database = Database(f"sqlite+aiosqlite:///{tmp_path}/lmgate.db")
        await database.upgrade()
    else:
        database = Database(backend.url(await backend.create(migrated=True)))
    yield database
    await database.close()
