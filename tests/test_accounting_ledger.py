"""The ledger against SQLite and PostgreSQL: batches, outages, the spool and its replay,
and records the database refuses."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from lmgate.accounting.ledger import Ledger, LedgerEntry, purge_bodies
from lmgate.storage.models import Base, BodyLog, UsageRecord

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{}"


@dataclass
class Backend:
    engine: AsyncEngine
    outage: Callable[[], AbstractAsyncContextManager[None]]
    """While inside, the database refuses every connection."""
    refusals: tuple[str, ...]
    """Statements after which the database refuses records whose request_id starts with
    `refused-` (a CHECK constraint on PostgreSQL, a trigger on SQLite) or `raised-` (a
    trigger raising an exception)."""


async def refuse_some(backend: Backend) -> None:
    """Make the database refuse the `refused-…` and `raised-…` records (see Backend)."""
    async with backend.engine.begin() as conn:
        for sql in backend.refusals:
            await conn.execute(text(sql))


_SQLITE_REFUSALS = tuple(
    f"CREATE TRIGGER refuse_{p} BEFORE INSERT ON usage_records "
    f"WHEN NEW.request_id LIKE '{p}-%' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    for p in ("refused", "raised")
)
_PG_REFUSALS = (
    "ALTER TABLE usage_records ADD CONSTRAINT no_refused CHECK (request_id NOT LIKE 'refused-%')",
    "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
    "IF NEW.request_id LIKE 'raised-%' THEN RAISE EXCEPTION 'refused'; END IF; "
    "RETURN NEW; END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER refuse BEFORE INSERT ON usage_records FOR EACH ROW EXECUTE FUNCTION refuse()",
)


@asynccontextmanager
async def _sqlite(tmp_path: Path) -> AsyncIterator[Backend]:
    folder = tmp_path / "db"
    folder.mkdir()
    engine = create_async_engine(f"sqlite+aiosqlite:///{folder}/ledger.db", poolclass=NullPool)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)

    @asynccontextmanager
    async def outage() -> AsyncIterator[None]:
        folder.rename(tmp_path / "gone")  # root ignores file modes; a missing folder it cannot
        try:
            yield
        finally:
            (tmp_path / "gone").rename(folder)

    yield Backend(engine, outage, _SQLITE_REFUSALS)
    await engine.dispose()


async def _pg_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_ADMIN, timeout=5)
    except (OSError, asyncpg.PostgresError) as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is unreachable at {PG_ADMIN}: {e}")
        pytest.skip(f"PostgreSQL is unreachable: {e}")


@asynccontextmanager
async def _postgres() -> AsyncIterator[Backend]:
    admin = await _pg_admin()
    name = f"lmgate_acc_{secrets.token_hex(4)}"
    await admin.execute(f"CREATE DATABASE {name}")
    engine = create_async_engine(PG_URL.format(name))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

        @asynccontextmanager
        async def outage() -> AsyncIterator[None]:
            await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            try:
                yield
            finally:
                await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")

        yield Backend(engine, outage, _PG_REFUSALS)
    finally:
        await engine.dispose()
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    cm = _sqlite(tmp_path) if request.param == "sqlite" else _postgres()
    async with cm as b:
        yield b


def _entry(
    i: int, *, bodies: bool = False, age: timedelta = timedelta(), prefix: str = "req"
) -> LedgerEntry:
    return LedgerEntry(
        request_id=f"{prefix}-{i}",
        created_at=datetime.now(UTC) - age,
        user_id=1,
        team_id=None,
        key_id=7,
        model="gpt-4o",
        deployment="openai/gpt-4o",
        status=200,
        prompt_tokens=10 + i,
        completion_tokens=20,
        cached_tokens=2,
        cost=0.001,
        latency_ms=12.5,
        ttft_ms=3.0,
        streamed=True,
        bodies=(f'{{"n": {i}}}', "{}") if bodies else None,
    )


def _ledger(engine: AsyncEngine, tmp_path: Path, **kw: float) -> Ledger:
    opts: dict[str, float] = {"flush_interval": 0.05, "retry_min": 0.05, "retry_max": 0.2}
    opts.update(kw)
    return Ledger(engine, spool_path=tmp_path / "spool" / "ledger.jsonl", **opts)  # type: ignore[arg-type]


async def _count(engine: AsyncEngine, table: type[Base] = UsageRecord) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _spool_lines(ledger: Ledger) -> int:
    p = ledger.spool_path
    return len(p.read_bytes().splitlines()) if p.exists() else 0


async def test_batches_close_and_columns(backend: Backend, tmp_path: Path) -> None:
    ledger = _ledger(backend.engine, tmp_path, flush_interval=30.0, batch_size=400)
    await ledger.start()
    for i in range(800):
        ledger.record(_entry(i))
    await _until(lambda: ledger.written == 800)  # woken by full batches, not by the timer
    for i in range(800, 850):
        ledger.record(_entry(i))
    assert ledger.pending == 50
    await ledger.close()
    assert (ledger.written, ledger.spooled, ledger.pending) == (850, 0, 0)
    assert await _count(backend.engine) == 850
    async with backend.engine.connect() as conn:
        row = (
            await conn.execute(select(UsageRecord).where(UsageRecord.request_id == "req-3"))
        ).one()
    assert (row.prompt_tokens, row.cached_tokens, row.key_id, row.streamed) == (13, 2, 7, True)
    async with backend.engine.connect() as conn:  # every row's values in its own columns
        total = (await conn.execute(select(func.sum(UsageRecord.prompt_tokens)))).scalar_one()
    assert total == sum(10 + i for i in range(850))


async def test_a_trickle_is_written_once_per_tick(backend: Backend, tmp_path: Path) -> None:
    """Records that arrive while a batch is being written wait for the next tick (or a full
    batch): a steady trickle costs one transaction per flush interval, not one per record."""
    ledger = _ledger(backend.engine, tmp_path, flush_interval=0.4, batch_size=1000)
    writes = 0
    write = ledger._write

    async def slow_write(rows: list[dict[str, object]]) -> None:
        nonlocal writes
        writes += 1
        await asyncio.sleep(0.05)  # a busy database: records keep arriving meanwhile
        await write(rows)

    ledger._write = slow_write  # type: ignore[method-assign]
    await ledger.start()
    for i in range(120):
        ledger.record(_entry(i))
        await asyncio.sleep(0.01)
    await ledger.close()
    assert await _count(backend.engine) == 120
    assert writes <= 6, writes  # ~1.2 s at one tick per 0.4 s, plus the final write


async def test_duplicates_are_ignored(backend: Backend, tmp_path: Path) -> None:
    ledger = _ledger(backend.engine, tmp_path)
    await ledger.start()
    for i in (1, 2, 1, 3, 2):
        ledger.record(_entry(i))
    await ledger.close()
    assert await _count(backend.engine) == 3


async def test_outage_spools_then_replays(backend: Backend, tmp_path: Path) -> None:
    ledger = _ledger(backend.engine, tmp_path, batch_size=50)
    await ledger.start()
    for i in range(20):
        ledger.record(_entry(i, bodies=True))
    await _until(lambda: ledger.written == 20)
    async with backend.outage():
        for i in range(20, 150):
            ledger.record(_entry(i, bodies=i % 2 == 0))
        await _until(lambda: ledger.spooled == 130)
        assert ledger.down and ledger.pending == 0
        assert _spool_lines(ledger) == 130
        await asyncio.sleep(0.5)  # several failed retries: still one spool, nothing lost
        for i in range(150, 160):
            ledger.record(_entry(i))
        await _until(lambda: ledger.spooled == 140)
    await _until(lambda: ledger.replayed == 140)
    assert not ledger.down
    assert _spool_lines(ledger) == 0
    assert await _count(backend.engine) == 160
    assert await _count(backend.engine, BodyLog) == 20 + 65
    ledger.record(_entry(160))
    await ledger.close()
    assert ledger.written == 21 and await _count(backend.engine) == 161


async def test_close_spools_and_next_process_replays(backend: Backend, tmp_path: Path) -> None:
    first = _ledger(backend.engine, tmp_path)
    await first.start()
    async with backend.outage():
        for i in range(30):
            first.record(_entry(i))
        await first.close(timeout=5)
    assert first.spooled == 30 and _spool_lines(first) == 30
    assert await _count(backend.engine) == 0

    with first.spool_path.open("ab") as f:
        f.write(b'{"request_id": "torn')  # a crash mid-write
    second = _ledger(backend.engine, tmp_path)
    await second.start()
    await _until(lambda: second.replayed == 30)
    assert await _count(backend.engine) == 30 and _spool_lines(second) == 0
    await second.close()


async def test_replay_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    """A crash between a replay's commit and the spool's truncation replays it twice."""
    ledger = _ledger(backend.engine, tmp_path)
    async with backend.outage():
        await ledger.start()
        for i in range(10):
            ledger.record(_entry(i))
        await ledger.close(timeout=5)
    spool = ledger.spool_path.read_bytes()
    for _ in range(2):
        ledger.spool_path.write_bytes(spool)
        again = _ledger(backend.engine, tmp_path)
        await again.start()
        await again.close()
        assert again.replayed == 10
    assert await _count(backend.engine) == 10


async def test_purge_bodies(backend: Backend, tmp_path: Path) -> None:
    ledger = _ledger(backend.engine, tmp_path)
    await ledger.start()
    for i in range(6):
        ledger.record(_entry(i, bodies=True, age=timedelta(days=40 if i < 4 else 1)))
    await ledger.close()
    assert await purge_bodies(backend.engine, timedelta(days=30)) == 4
    assert await _count(backend.engine, BodyLog) == 2
    assert await _count(backend.engine) == 6


async def test_record_only_queues(tmp_path: Path) -> None:
    """Recording never touches the database: it waits for the writer's next tick."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/x.db")
    ledger = _ledger(engine, tmp_path, batch_size=10_000)
    for i in range(2_000):
        ledger.record(_entry(i))
    assert ledger.pending == 2_000 and ledger.written == 0
    await engine.dispose()


def _rejected_ids(ledger: Ledger) -> list[str]:
    p = ledger.rejected_path
    lines = p.read_bytes().splitlines() if p.exists() else []
    return [orjson.loads(line)["request_id"] for line in lines]


def _mixed(start: int, stop: int) -> list[LedgerEntry]:
    """Good records, with a `refused-` one every 5th and a `raised-` one every 7th."""
    prefixes = {0: "refused"}
    return [
        _entry(i, bodies=True, prefix=prefixes.get(i % 5, "raised" if i % 7 == 0 else "req"))
        for i in range(start, stop)
    ]


async def _ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set((await conn.execute(select(UsageRecord.request_id))).scalars())


async def test_refused_records_are_set_aside(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch the database refuses is written row by row: the good rows land, only the
    refused ones go to `<spool>.rejected`, and the ledger is not taken for down."""
    await refuse_some(backend)
    ledger = _ledger(backend.engine, tmp_path, batch_size=100)
    await ledger.start()
    entries = _mixed(0, 30)  # one batch: nothing is written before the next await
    bad = [e.request_id for e in entries if not e.request_id.startswith("req-")]
    assert {b.split("-")[0] for b in bad} == {"refused", "raised"}
    with caplog.at_level(logging.ERROR, "lmgate.ledger"):
        for e in entries:
            ledger.record(e)
        await _until(lambda: ledger.written + ledger.rejected == 30)
    assert sorted(_rejected_ids(ledger)) == sorted(bad)
    assert ledger.written == 30 - len(bad) and ledger.rejected == len(bad)
    assert await _ids(backend.engine) == {e.request_id for e in entries} - set(bad)
    assert await _count(backend.engine, BodyLog) == 30 - len(bad)
    assert not ledger.down and ledger.spooled == 0 and _spool_lines(ledger) == 0
    [message] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"refused {len(bad)} record(s)" in message and str(ledger.rejected_path) in message
    assert '{"n":' not in message and "refused-" not in message  # no bodies, no values

    for i in range(30, 40):  # later records are written as usual, in one batch
        ledger.record(_entry(i))
    await _until(lambda: ledger.written == 30 - len(bad) + 10)
    await ledger.close()
    assert ledger.rejected == len(bad) and await _count(backend.engine) == 40 - len(bad)


async def test_refused_records_in_the_spool_are_set_aside(backend: Backend, tmp_path: Path) -> None:
    """The replay of a spool holding refused records writes the rest and empties the spool."""
    await refuse_some(backend)
    first = _ledger(backend.engine, tmp_path)
    async with backend.outage():
        await first.start()
        for e in _mixed(0, 20):
            first.record(e)
        await first.close(timeout=5)
    assert first.spooled == 20 and first.rejected == 0

    second = _ledger(backend.engine, tmp_path, batch_size=8)  # the spool in 3 batches
    await second.start()
    await _until(lambda: not second._spool_dirty)
    bad = {e.request_id for e in _mixed(0, 20) if not e.request_id.startswith("req-")}
    assert set(_rejected_ids(second)) == bad and second.rejected == len(bad)
    assert second.replayed == 20 - len(bad) and _spool_lines(second) == 0
    assert not second.down
    second.record(_entry(99))
    await second.close()
    assert await _count(backend.engine) == 20 - len(bad) + 1


async def test_outage_during_the_row_by_row_write(backend: Backend, tmp_path: Path) -> None:
    """If the database goes away while a refused batch is written row by row, the rows not
    yet tried are spooled, and replayed (and sorted out) once it is back."""
    await refuse_some(backend)
    ledger = _ledger(backend.engine, tmp_path, batch_size=100)
    write = ledger._write
    outage = backend.outage()
    single = 0

    async def write_then_fail(rows: list[dict[str, object]]) -> None:
        nonlocal single
        if len(rows) == 1:
            single += 1
            if single == 8:  # before the eighth row on its own, the database goes away
                await outage.__aenter__()
        await write(rows)

    ledger._write = write_then_fail  # type: ignore[method-assign]
    await ledger.start()
    entries = _mixed(0, 20)
    for e in entries:
        ledger.record(e)
    await _until(lambda: ledger.down)
    bad = {e.request_id for e in entries if not e.request_id.startswith("req-")}
    early = set(_rejected_ids(ledger))
    assert early and early < bad  # those tried before the outage are set aside already
    assert ledger.spooled == 20 - 7 and ledger.written + ledger.rejected == 7
    await outage.__aexit__(None, None, None)
    await _until(lambda: not ledger.down)
    await ledger.close()
    assert sorted(_rejected_ids(ledger)) == sorted(bad)  # each one once
    assert await _ids(backend.engine) == {e.request_id for e in entries} - bad
    assert _spool_lines(ledger) == 0


async def test_a_slow_database_does_not_fill_memory(backend: Backend, tmp_path: Path) -> None:
    """Records beyond `max_pending` go to the spool instead of piling up in memory (checked
    each time a batch is written), and are all written once the database catches up."""
    ledger = _ledger(backend.engine, tmp_path, batch_size=50, max_pending=200)
    write = ledger._write
    most = 0

    async def slow_write(rows: list[dict[str, object]]) -> None:
        nonlocal most
        most = max(most, ledger.pending)
        await asyncio.sleep(0.05)
        await write(rows)

    ledger._write = slow_write  # type: ignore[method-assign]
    await ledger.start()
    for i in range(3000):
        ledger.record(_entry(i))
        if i % 100 == 0:
            await asyncio.sleep(0.01)
    assert ledger.spooled > 0 and most <= 200
    await ledger.close()
    again = _ledger(backend.engine, tmp_path)
    await again.start()
    await _until(lambda: _spool_lines(again) == 0)
    await again.close()
    assert await _count(backend.engine) == 3000
