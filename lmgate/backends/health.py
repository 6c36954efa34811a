"""Health and readiness probes of workers, and leader election across gateway replicas."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from sqlalchemy import text

from lmgate.storage.db import Database

log = logging.getLogger("lmgate.backends")

_PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3.0)
_LEADER_LOCK_ID = 0x6C6D_6761_7465 + 1  # next to the migrations' lock


class Prober:
    """HTTP checks of workers over one shared session (no proxy: workers are direct)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=_PROBE_TIMEOUT, trust_env=False)
        return self._session

    async def healthy(self, base_url: str) -> bool:
        """Whether `GET /health` (beside the `/v1` base URL) answers 200."""
        return await self._ok(base_url.removesuffix("/v1") + "/health")

    async def ready(self, base_url: str) -> bool:
        """Whether both `/health` and `/v1/models` answer 200: the worker can serve."""
        return await self.healthy(base_url) and await self._ok(base_url + "/models")

    async def _ok(self, url: str) -> bool:
        try:
            async with self._client().get(url) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class Leadership:
    """Who schedules: the holder of a PostgreSQL advisory lock; on SQLite, this process.

    The lock lives as long as the connection that took it, so a crashed leader's lock is
    released by PostgreSQL and another replica takes over at its next attempt.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None
        self.is_leader = db.is_sqlite

    async def try_acquire(self) -> bool:
        """Take the lock if free; check that a held lock's connection is still alive."""
        if self.db.is_sqlite:
            return True
        try:
            if self._conn is None:
                self._conn = await self.db.engine.connect()
                got = await self._conn.scalar(
                    text("SELECT pg_try_advisory_lock(:k)"), {"k": _LEADER_LOCK_ID}
                )
                await self._conn.commit()
                if not got:
                    await self._release_connection()
                self.is_leader = bool(got)
            else:
                await self._conn.execute(text("SELECT 1"))
                await self._conn.commit()
        except Exception as e:  # a dropped connection loses the lock with it
            log.warning("leader lock: %s", e)
            await self._release_connection()
            self.is_leader = False
        return self.is_leader

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.shield(conn.close())
            except Exception:
                log.debug("closing the leader connection failed", exc_info=True)

    async def release(self) -> None:
        """Give up leadership (closing the connection releases the lock)."""
        self.is_leader = self.db.is_sqlite
        await self._release_connection()
