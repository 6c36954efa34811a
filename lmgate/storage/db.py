"""The database: an async SQLAlchemy engine, sessions, and Alembic migrations to the head."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from lmgate.config.schema import GatewayConfig

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
_PG_LOCK_ID = 0x6C6D_6761_7465  # "lmgate": serialises migrations across replicas
_SQLITE_BUSY_MS = 30_000


def database_url(config: GatewayConfig) -> str:
    """The configured URL, or a SQLite file `lmgate.db` beside the configuration file.

    A relative SQLite path is taken relative to the configuration file's folder.
    """
    url = config.database.url
    if not url:
        return f"sqlite+aiosqlite:///{config.base_dir / 'lmgate.db'}"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and _is_file(parsed.database):
        path = Path(parsed.database or "")
        if not path.is_absolute():
            return parsed.set(database=str(config.base_dir / path)).render_as_string(False)
    return url


def alembic_config() -> Config:
    """Alembic's configuration for lmgate's migrations, independent of the working directory."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


class Database:
    """An async engine and its session factory, created from a SQLAlchemy URL."""

    def __init__(self, url: str, **engine_args: Any) -> None:
        self.url = url
        parsed = make_url(url)
        self.safe_url = parsed.render_as_string(hide_password=True)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self.sqlite_path = parsed.database if self.is_sqlite and _is_file(parsed.database) else None
        if self.is_sqlite and self.sqlite_path:
            # One writer at a time anyway; each pooled connection keeps its own page cache
            # (2 MiB) and thread, so a small pool bounds the memory.
            engine_args = {"pool_size": 2, "max_overflow": 2, **engine_args}
        self.engine: AsyncEngine = create_async_engine(url, **engine_args)
        self.reader: AsyncEngine = self.engine
        """For read-only work (the gateway's polls): on SQLite, deferred transactions that do
        not queue behind writers for the write lock."""
        if self.is_sqlite:
            _configure_sqlite(self.engine, immediate=True)
            self.reader = create_async_engine(url, **engine_args)
            _configure_sqlite(self.reader, immediate=False)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)

    def __repr__(self) -> str:
        return f"Database({self.safe_url!r})"

    def session(self) -> AsyncSession:
        """A new session; use it as `async with db.session() as s, s.begin(): ...`."""
        return self._sessions()

    async def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to `revision`; safe when several replicas start at once."""
        if self.sqlite_path:
            Path(self.sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.sqlite_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                await self._run_alembic(revision)
            finally:
                os.close(fd)  # closing the descriptor releases the lock
        else:
            await self._run_alembic(revision)

    async def _run_alembic(self, revision: str) -> None:
        async with self.engine.connect() as conn:
            await conn.run_sync(_upgrade_sync, revision, self.engine.dialect.name == "postgresql")

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()
        if self.reader is not self.engine:
            await self.reader.dispose()


def _upgrade_sync(conn: Connection, revision: str, pg_lock: bool) -> None:
    """Run `alembic upgrade` on `conn`, under a PostgreSQL advisory lock if asked."""
    if pg_lock:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_ID})
        conn.commit()
    try:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()
    finally:
        if pg_lock:
            conn.rollback()
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_ID})
            conn.commit()


def _is_file(database: str | None) -> bool:
    return bool(database) and database != ":memory:" and not (database or "").startswith("file:")


def _configure_sqlite(engine: AsyncEngine, immediate: bool) -> None:
    """WAL, a busy timeout, foreign keys, and (`immediate`) `BEGIN IMMEDIATE` transactions.

    Immediate transactions take the write lock up front, so that a transaction that reads
    and then writes waits for other writers instead of failing with "database is locked".
    Readers use deferred transactions: in WAL mode they never wait for writers.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below emit BEGIN
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)
