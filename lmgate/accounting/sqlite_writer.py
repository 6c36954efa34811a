"""The ledger's writes to SQLite: a whole batch in one hand-off to a thread of its own.

Through aiosqlite each statement is a hand-off to its thread and back, and each hand-off waits
for a turn of the event loop. Under full load that loop is busy with requests, so the ledger
fell behind them (about 4,000 records/s written while 11,500 requests/s were served, the rest
queuing in memory). Here a batch is one hand-off: the thread opens the file, writes the batch
in one `BEGIN IMMEDIATE` transaction and closes it. Opening per batch costs tens of µs and
means a database file that vanished is noticed at once, like an unreachable server.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy.exc import DBAPIError

Statement = tuple[str, Sequence[Any]]


class SqliteWriter:
    """Runs batches of statements against one SQLite file, in order, in one worker thread."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lmgate-ledger")

    async def write(self, statements: list[Statement]) -> None:
        """Run `statements` in one transaction; errors come as SQLAlchemy's `DBAPIError`s."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._write, statements)

    def _write(self, statements: list[Statement]) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        except sqlite3.Error as e:  # no statement: an outage, as when a server is unreachable
            raise DBAPIError.instance(None, None, e, sqlite3.Error) from None
        sql = "BEGIN IMMEDIATE"
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(sql)
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise DBAPIError.instance(sql, None, e, sqlite3.Error) from None
        finally:
            conn.close()

    def close(self) -> None:
        """Finish the batch being written, then stop the thread."""
        self._thread.shutdown(wait=True)
