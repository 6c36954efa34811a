"""The usage ledger: one record per request, written off the hot path in batches.

`Ledger.record` only appends to a deque. A background task writes batches: one transaction
per batch, duplicates of `request_id` ignored, so that any replay is idempotent; on SQLite
the whole batch goes to a writer thread of its own in one hand-off (`sqlite_writer`), on
PostgreSQL through the driver's executemany. While the database is unreachable, batches go to
a spool file (JSON lines, fsync'd) and are replayed once it answers again; the file is
truncated only after every line of it is committed. A database that is up but slower than
the traffic gets the same treatment for what exceeds `max_pending` records in memory. A batch
the database refuses (a constraint, a value it cannot store) is written again one row per
transaction, and only the refused rows are set aside, in `<spool>.rejected`. `close()` writes
what is left, to the database or the spool. A `kill -9` loses only the records still in
memory: normally at most `flush_interval` seconds of traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import orjson
from sqlalchemy import Table, delete, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Insert

from lmgate.accounting.sqlite_writer import SqliteWriter, Statement
from lmgate.storage.models import BodyLog, UsageRecord

log = logging.getLogger("lmgate.ledger")

Row = dict[str, Any]
_OUTAGE = (DBAPIError, OSError, TimeoutError)
"""What a write can raise: an outage, unless `_refused` says the database refused the rows."""
_REFUSALS = (IntegrityError, DataError, ProgrammingError)
_REFUSAL_SQLSTATES = ("22", "23", "42", "P0")
"""Data exception, integrity violation, syntax or access rule, PL/pgSQL `RAISE` (a trigger):
asyncpg reports most of them as a plain DBAPIError that carries the SQLSTATE."""
_USAGE: Table = UsageRecord.__table__  # type: ignore[assignment]
_BODIES: Table = BodyLog.__table__  # type: ignore[assignment]
_LIMITS = {"request_id": 128, "model": 200, "deployment": 400, "error_type": 64}
"""Column lengths: longer strings are cut, so that no record can be refused for its size."""


class _HasEngine(Protocol):
    @property
    def engine(self) -> AsyncEngine: ...


@dataclass(slots=True)
class LedgerEntry:
    """One request's line in the ledger; `bodies` = (request, response) when they are logged."""

    request_id: str
    created_at: datetime
    user_id: int | None
    team_id: int | None
    key_id: int | None
    model: str
    deployment: str | None
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    streamed: bool = False
    estimated: bool = False
    cache_hit: bool = False
    error_type: str | None = None
    bodies: tuple[str, str] | None = None


_COLUMNS = tuple(f for f in LedgerEntry.__dataclass_fields__ if f != "bodies")


def _row(e: LedgerEntry) -> Row:
    row: Row = {f: getattr(e, f) for f in _COLUMNS}
    if e.bodies is not None:
        row["bodies"] = e.bodies
    return _storable(row)


_COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "status")
_INT_MAX = 2**31 - 1


def _storable(row: Row) -> Row:
    """Cut long strings and replace NUL characters, which PostgreSQL text cannot hold: the
    database would refuse the record, and with it every batch and replay, for ever."""
    for f, n in _LIMITS.items():
        if isinstance(row[f], str):
            row[f] = row[f].replace("\x00", "\ufffd")[:n]
    if row.get("bodies"):
        row["bodies"] = tuple(b.replace("\x00", "\ufffd") for b in row["bodies"])
    for f in _COUNTS:  # an upstream's absurd count must not overflow the integer column
        value = row.get(f)
        if isinstance(value, int) and not 0 <= value <= _INT_MAX:
            row[f] = min(max(value, 0), _INT_MAX)
    return row


_SQLITE_ROWS = 256 if sqlite3.sqlite_version_info >= (3, 32, 0) else 32
"""Rows per SQLite INSERT, within its limit on parameters (32766 since 3.32, 999 before)."""


def _insert_sql(paramstyle: str) -> str:
    """The ledger's INSERT, idempotent on `request_id`, in the driver's parameter style."""
    n = len(_COLUMNS)
    marks = [f"${i}" for i in range(1, n + 1)] if paramstyle == "numeric_dollar" else ["?"] * n
    if paramstyle not in ("numeric_dollar", "qmark"):
        marks = ["%s"] * n
    return _insert_values(f"({', '.join(marks)})")


def _insert_values(values: str) -> str:
    return (
        f"INSERT INTO {_USAGE.name} ({', '.join(_COLUMNS)}) VALUES {values} "
        "ON CONFLICT (request_id) DO NOTHING"
    )


_SQLITE_INSERTS = {
    1 << k: _insert_values(", ".join(["(" + ", ".join("?" * len(_COLUMNS)) + ")"] * (1 << k)))
    for k in range(_SQLITE_ROWS.bit_length())
}
"""SQLite's multi-row INSERTs, by number of rows (powers of two)."""


def _chunks(values: list[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    """`values` in runs of power-of-two sizes up to `_SQLITE_ROWS`: few distinct statements
    to prepare, each one cached by the driver."""
    i = 0
    while i < len(values):
        size = min(_SQLITE_ROWS, 1 << ((len(values) - i).bit_length() - 1))
        yield values[i : i + size]
        i += size


_CREATED_AT = _COLUMNS.index("created_at")
_SQLITE_BODIES = (
    f"INSERT INTO {_BODIES.name} (request_id, created_at, user_id, key_id, request, response) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING"
)


def _naive_utc_text(when: datetime) -> str:
    """A time as SQLite holds it (SQLAlchemy's format): naive UTC text."""
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when.isoformat(" ", "microseconds")


def _upsert_ignore(dialect: str, table: Table, key: str) -> Insert:
    """An INSERT that skips rows whose `key` already exists."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=[key])
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=[key])
    return insert(table).prefix_with("IGNORE", dialect="mysql")


def _append_spool(path: Path, rows: list[Row]) -> None:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_spool(path: Path, offset: int, count: int) -> tuple[list[Row], int]:
    """Up to `count` rows from `offset`; a torn last line (a crash mid-write) is skipped."""
    rows: list[Row] = []
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return rows, offset
    with f:
        f.seek(offset)
        while len(rows) < count:
            line = f.readline()
            if not line:
                break
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("skipping a damaged line of the ledger spool %s", path)
                continue
            row["created_at"] = datetime.fromisoformat(row["created_at"])
            rows.append(_storable(row))
        return rows, f.tell()


def _refused(error: BaseException) -> bool:
    """True if the database answered a statement with a refusal; False for an outage (no
    connection, a dropped one, a timeout, a server shutting down), which is worth retrying."""
    if not isinstance(error, DBAPIError) or error.connection_invalidated:
        return False
    if not error.statement:  # while connecting, or at COMMIT: only a deferred constraint
        return isinstance(error, IntegrityError)
    if isinstance(error, _REFUSALS):
        return True
    sqlstate = getattr(error.orig, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_REFUSAL_SQLSTATES)


def _reason(error: BaseException) -> str:
    """The error's class and SQLSTATE, never its message: that holds the row's values."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return f"{type(error).__name__} {sqlstate}" if sqlstate else type(error).__name__


def _truncate(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError), path.open("r+b") as f:
        f.truncate(0)
        os.fsync(f.fileno())


class Ledger:
    """Batches usage records into the database, spooling them to a file while it is down."""

    def __init__(
        self,
        db: AsyncEngine | _HasEngine,
        *,
        spool_path: Path,
        flush_interval: float = 1.0,
        batch_size: int = 500,
        write_timeout: float = 10.0,
        retry_min: float = 0.5,
        retry_max: float = 5.0,
        max_pending: int = 50_000,
    ) -> None:
        self.engine: AsyncEngine = db if isinstance(db, AsyncEngine) else db.engine
        self.spool_path = spool_path
        self.rejected_path = spool_path.with_name(spool_path.name + ".rejected")
        self.flush_interval = flush_interval
        self.batch_size = batch_size
        self.max_pending = max(max_pending, 2 * batch_size)
        """Records held in memory at most: beyond, the oldest go to the spool (~300 B each)."""
        self.write_timeout = write_timeout
        self.retry_min, self.retry_max = retry_min, retry_max
        self.written = self.spooled = self.replayed = self.rejected = 0
        dialect = self.engine.dialect.name
        self._sqlite = dialect == "sqlite"
        self._usage_sql = _insert_sql(self.engine.dialect.paramstyle)
        self._insert_bodies = _upsert_ignore(dialect, _BODIES, "request_id")
        path = self.engine.url.database if self._sqlite else None
        self._sqlite_writer = (
            SqliteWriter(path, write_timeout) if path and path != ":memory:" else None
        )
        self._queue: deque[LedgerEntry] = deque()
        self._inflight: list[Row] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down = False
        self._backoff = retry_min
        self._retry_at = 0.0
        self._spool_dirty = False

    @property
    def pending(self) -> int:
        """Records in memory, not yet in the database nor in the spool."""
        return len(self._queue) + len(self._inflight)

    @property
    def down(self) -> bool:
        """True while the database is unreachable (records go to the spool)."""
        return self._down

    def record(self, entry: LedgerEntry) -> None:
        """Queue one record: O(1), never blocks."""
        self._queue.append(entry)
        if len(self._queue) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    async def start(self) -> None:
        """Start the background writer; it first replays a spool left by an earlier process."""
        self._spool_dirty = self.spool_path.exists() and self.spool_path.stat().st_size > 0
        self._task = asyncio.create_task(self._run(), name="lmgate-ledger")

    async def close(self, timeout: float = 10.0) -> None:
        """Write every queued record, to the database or else to the spool, and stop."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task, timeout)
            except TimeoutError:
                log.warning("ledger: the database is too slow at shutdown; spooling the rest")
        else:
            await self._flush()
        rest = self._inflight + [_row(e) for e in self._queue]
        self._inflight, self._queue = [], deque()
        if rest:
            _append_spool(self.spool_path, rest)
            self.spooled += len(rest)
        if self._sqlite_writer is not None:
            self._sqlite_writer.close()

    async def _run(self) -> None:
        while True:
            try:
                await self._flush()
            except Exception:  # never let the writer die: the next tick tries again
                log.exception("ledger: unexpected error while writing")
            if self._closing and not self._queue:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()

    async def _flush(self) -> None:
        retry_due = not self._closing and time.monotonic() >= self._retry_at
        if self._spool_dirty and (not self._down or retry_due):
            await self._replay()
        while self._queue:
            if len(self._queue) > self.max_pending:  # the database is slower than the traffic
                excess = len(self._queue) - self.max_pending // 2
                self._inflight = [_row(self._queue.popleft()) for _ in range(excess)]
                await self._spool(self._inflight)  # replayed when the database has time
            n = min(self.batch_size, len(self._queue))
            self._inflight = [_row(self._queue.popleft()) for _ in range(n)]
            if self._down:
                await self._spool(self._inflight)
            else:
                try:
                    await self._write(self._inflight)
                    self.written += n
                except _OUTAGE as e:
                    written, left = await self._salvage(self._inflight, e)
                    self.written += written
                    if left:
                        await self._spool(left)
            self._inflight = []
            if len(self._queue) < self.batch_size and not self._closing:
                break  # the rest, queued while writing, waits for the next tick or a full batch

    async def _write(self, rows: list[Row]) -> None:
        bodies = [
            {
                "request_id": r["request_id"],
                "created_at": r["created_at"],
                "user_id": r["user_id"],
                "key_id": r["key_id"],
                "request": r["bodies"][0],
                "response": r["bodies"][1],
            }
            for r in rows
            if r.get("bodies")
        ]
        values = [self._values(r) for r in rows]
        if self._sqlite_writer is not None:
            # Multi-row INSERTs: sqlite3's executemany releases and re-takes the GIL for
            # every row, each time a context switch with the event loop's thread.
            statements: list[Statement] = [
                (_SQLITE_INSERTS[len(chunk)], tuple(chain.from_iterable(chunk)))
                for chunk in _chunks(values)
            ]
            statements += [(_SQLITE_BODIES, self._body_values(b)) for b in bodies]
            async with asyncio.timeout(self.write_timeout):
                await self._sqlite_writer.write(statements)
            return
        async with asyncio.timeout(self.write_timeout), self.engine.begin() as conn:
            # The driver's own executemany: SQLAlchemy's per-row parameter processing would
            # cost several times more CPU than the insert itself.
            await conn.exec_driver_sql(self._usage_sql, values)
            if bodies:
                await conn.execute(self._insert_bodies, bodies)

    @staticmethod
    def _body_values(b: Row) -> tuple[Any, ...]:
        when = _naive_utc_text(b["created_at"])
        return (b["request_id"], when, b["user_id"], b["key_id"], b["request"], b["response"])

    def _values(self, row: Row) -> tuple[Any, ...]:
        """A row as the driver's positional parameters (SQLite keeps naive UTC text)."""
        values = tuple(row[c] for c in _COLUMNS)
        if self._sqlite:
            i = _CREATED_AT
            values = (*values[:i], _naive_utc_text(row["created_at"]), *values[i + 1 :])
        return values

    async def _spool(self, rows: list[Row]) -> None:
        await asyncio.to_thread(_append_spool, self.spool_path, rows)
        self.spooled += len(rows)
        self._spool_dirty = True

    async def _replay(self) -> None:
        """Write the whole spool to the database, then empty it."""
        offset, done = 0, 0
        try:
            while True:
                rows, offset = await asyncio.to_thread(
                    _read_spool, self.spool_path, offset, self.batch_size
                )
                if not rows:
                    break
                try:
                    await self._write(rows)
                    done += len(rows)
                except _OUTAGE as e:
                    written, left = await self._salvage(rows, e)
                    done += written
                    if left:  # the spool stays, and is replayed whole once the database is
                        return  # back: records refused meanwhile are then set aside again
        except OSError as e:  # the spool could not be read
            self._failed(e)
            return
        await asyncio.to_thread(_truncate, self.spool_path)
        self.replayed += done
        self._spool_dirty = False
        if self._down:
            log.warning("ledger: the database is back; %d spooled records replayed", done)
        self._down, self._backoff = False, self.retry_min

    async def _salvage(self, rows: list[Row], error: BaseException) -> tuple[int, list[Row]]:
        """A batch whose write raised `error`: returns (rows written, rows left to spool).

        On an outage every row is left. On a refusal each row is written in a transaction of
        its own, and the rows refused are set aside; if the database goes away meanwhile,
        the rows not yet tried are left.
        """
        if not _refused(error):
            self._failed(error)
            return 0, rows
        written = 0
        refused: list[Row] = []
        left: list[Row] = []
        for i, row in enumerate(rows):
            try:
                await self._write([row])
                written += 1
            except _OUTAGE as e:
                if not _refused(e):
                    self._failed(e)
                    left = rows[i:]
                    break
                refused.append(row)
                error = e
        if refused:
            await self._reject(refused, error)
        return written, left

    async def _reject(self, rows: list[Row], error: BaseException) -> None:
        """Append rows the database refused to the rejected file, where no retry jams on them."""
        self.rejected += len(rows)
        try:
            await asyncio.to_thread(_append_spool, self.rejected_path, rows)
        except OSError as e:
            log.error(
                "ledger: the database refused %d record(s) (%s); they are lost: %s cannot be "
                "written (%s)",
                len(rows),
                _reason(error),
                self.rejected_path,
                type(e).__name__,
            )
            return
        log.error(
            "ledger: the database refused %d record(s) (%s); they are set aside in %s",
            len(rows),
            _reason(error),
            self.rejected_path,
        )

    def _failed(self, error: BaseException) -> None:
        if not self._down:
            log.warning(
                "ledger: the database is unreachable (%s); spooling records to %s",
                type(error).__name__,
                self.spool_path,
            )
            self._down, self._backoff = True, self.retry_min
        else:
            self._backoff = min(self._backoff * 2, self.retry_max)
        self._retry_at = time.monotonic() + self._backoff


async def purge_bodies(engine: AsyncEngine, older_than: timedelta) -> int:
    """Delete logged bodies older than the retention period; returns how many were removed."""
    cutoff = datetime.now(UTC) - older_than
    async with engine.begin() as conn:
        result = await conn.execute(delete(_BODIES).where(_BODIES.c.created_at < cutoff))
        return result.rowcount or 0
