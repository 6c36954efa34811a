"""Migrations: the migrated schema matches the models, and concurrent upgrades are safe."""

from __future__ import annotations

import asyncio
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

import lmgate.backends.models  # noqa: F401
from lmgate.config.loader import parse_config
from lmgate.storage.db import Database, database_url
from lmgate.storage.models import Base
from tests.dbfixtures import backend_fixture, db_fixture, empty_db_url_fixture, pg_server_fixture  # noqa: F401

TABLES = {
    "teams",
    "users",
    "api_keys",
    "budgets",
    "prices",
    "usage_records",
    "body_logs",
    "backend_instances",
    "backend_models",
    "backend_starts",
}


def _diffs(conn: Connection) -> list[object]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, Base.metadata))


async def test_migrated_schema_matches_models(db: Database) -> None:
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert tables == TABLES | {"alembic_version"}


async def test_upgrade_twice_is_a_no_op(empty_db_url: str) -> None:
    db = Database(empty_db_url)
    await db.upgrade()
    await db.upgrade()
    async with db.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    await db.close()
    assert [v[0] for v in versions] == ["0002"]


UPGRADE = "import asyncio, sys; from lmgate.storage.db import Database; " + (
    "db = Database(sys.argv[1]); asyncio.run(db.upgrade()); asyncio.run(db.close())"
)


async def test_concurrent_upgrades_from_three_processes(empty_db_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", UPGRADE, empty_db_url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err.decode() for _, err in results]
    db = Database(empty_db_url)
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
        count = await conn.scalar(text("SELECT count(*) FROM alembic_version"))
    await db.close()
    assert count == 1


async def test_concurrent_upgrades_from_three_tasks(empty_db_url: str) -> None:
    dbs = [Database(empty_db_url) for _ in range(3)]
    await asyncio.gather(*(d.upgrade() for d in dbs))
    async with dbs[0].engine.connect() as conn:
        assert await conn.run_sync(_diffs) == []
    for d in dbs:
        await d.close()


def test_database_url_defaults_beside_the_config(tmp_path: object) -> None:
    cfg = parse_config("{}")
    assert database_url(cfg) == f"sqlite+aiosqlite:///{cfg.base_dir / 'lmgate.db'}"
    cfg = parse_config("database: {url: 'sqlite+aiosqlite:///data/x.db'}")
    assert database_url(cfg) == f"sqlite+aiosqlite:///{cfg.base_dir / 'data/x.db'}"
    pg = "postgresql+asyncpg://u:secret@h/db"
    assert database_url(parse_config(f"database: {{url: '{pg}'}}")) == pg


def test_safe_url_hides_the_password() -> None:
    db = Database("postgresql+asyncpg://lmgate:s3cret@db.example/lmgate")
    assert "s3cret" not in db.safe_url and "s3cret" not in repr(db)
    assert db.safe_url == "postgresql+asyncpg://lmgate:***@db.example/lmgate"


async def test_sqlite_pragmas(tmp_path: object) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path}/p.db")
    async with db.engine.connect() as conn:
        assert await conn.scalar(text("PRAGMA journal_mode")) == "wal"
        assert await conn.scalar(text("PRAGMA foreign_keys")) == 1
        assert await conn.scalar(text("PRAGMA busy_timeout")) == 30000
    await db.close()
