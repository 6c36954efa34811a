"""The ledger against SQLite and PostgreSQL: batches, outages, the spool and its replay."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, select
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

    yield Backend(engine, outage)
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

        yield Backend(engine, outage)
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


def _entry(i: int, *, bodies: bool = False, age: timedelta = timedelta()) -> LedgerEntry:
    return LedgerEntry(
        request_id=f"req-{i}",
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
