"""Users, teams, keys, budgets, prices and usage reports on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from lmgate.storage import budgets, keys, prices, reports, users
from lmgate.storage.db import Database
from lmgate.storage.errors import ConflictError, InvalidError, NotFoundError
from lmgate.storage.models import ApiKey, Base, UsageRecord
from lmgate.storage.timeutil import as_utc, parse_duration, parse_time
from tests.dbfixtures import backend_fixture, db_fixture, pg_server_fixture  # noqa: F401

T0 = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)  # a Wednesday


async def test_users_and_teams(db: Database) -> None:
    await users.create_team(db, "ml")
    alice = await users.create_user(db, "alice", email="a@x.org", role="admin", team="ml")
    assert (alice.team, alice.role, alice.disabled) == ("ml", "admin", False)
    await users.create_user(db, "bob")
    assert [u.name for u in await users.list_users(db)] == ["alice", "bob"]
    assert [u.name for u in await users.list_users(db, team="ml")] == ["alice"]
    assert [(t.name, t.members) for t in await users.list_teams(db)] == [("ml", 1)]
    bob = await users.update_user(db, "bob", team="ml", disabled=True, log_bodies=True)
    assert (bob.team, bob.disabled, bob.log_bodies) == ("ml", True, True)
    assert bob.updated_at > (await users.get_user(db, "alice")).updated_at
    assert (await users.update_user(db, "bob", team=None)).team is None
    assert [u.name for u in await users.team_members(db, "ml")] == ["alice"]
    await users.delete_team(db, "ml")
    assert (await users.get_user(db, "alice")).team is None
    await users.delete_user(db, "bob")
    with pytest.raises(NotFoundError):
        await users.get_user(db, "bob")


async def test_user_errors(db: Database) -> None:
    await users.create_user(db, "alice")
    with pytest.raises(ConflictError):
        await users.create_user(db, "alice")
    with pytest.raises(NotFoundError, match="no team named 'nope'"):
        await users.create_user(db, "carol", team="nope")
    with pytest.raises(InvalidError) as e:
        await users.create_user(db, "carol", role="root")
    assert e.value.param == "role"
    with pytest.raises(InvalidError):
        await users.create_user(db, "  ")
    await users.create_team(db, "ml")
    with pytest.raises(ConflictError):
        await users.create_team(db, "ml")
    with pytest.raises(NotFoundError):
        await users.update_user(db, "nobody", role="admin")


async def _dump(db: Database) -> str:
    """Every value of every table, as text."""
    parts = []
    async with db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            parts += [repr(tuple(r)) for r in await conn.execute(table.select())]
    return "\n".join(parts)


async def test_key_secret_is_returned_once_and_stored_hashed(db: Database) -> None:
    await users.create_user(db, "alice")
    row, secret = await keys.create_key(
        db, "alice", name="laptop", expires_in=timedelta(days=1), models=["gpt-4o*"]
    )
    assert secret.startswith("lmg-") and len(secret) == 44
    assert (
        row.prefix == secret[:12] and row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    )
    dump = await _dump(db)
    assert row.secret_hash in dump and secret not in dump and secret[12:] not in dump
    found = await keys.find_key(db, secret)
    assert found is not None and found.id == row.id
    assert await keys.find_key(db, secret + "x") is None
    [view] = await keys.list_keys(db, "alice")
    assert (view.prefix, view.status, view.allowed_models) == (row.prefix, "active", ["gpt-4o*"])
    assert not hasattr(view, "secret_hash")


async def test_revoke_bumps_updated_at_and_hides_the_key(db: Database) -> None:
    await users.create_user(db, "alice")
    row, _ = await keys.create_key(db, "alice")
    await asyncio.sleep(0.01)
    revoked = await keys.revoke_key(db, row.prefix)
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert revoked.updated_at > as_utc(row.updated_at)
    assert await keys.list_keys(db) == []
    assert [k.prefix for k in await keys.list_keys(db, include_revoked=True)] == [row.prefix]
    again = await keys.revoke_key(db, row.prefix)
    assert again.revoked_at == revoked.revoked_at
    with pytest.raises(NotFoundError):
        await keys.revoke_key(db, "lmg-missing")


async def test_key_with_budget_expiry_and_errors(db: Database) -> None:
    await users.create_user(db, "alice")
    row, _ = await keys.create_key(db, "alice", budget=(20.0, "month"))
    b = await budgets.get_budget(db, "key", row.prefix)
    assert (b.amount, b.period, b.scope_id) == (20.0, "month", row.id)
    with pytest.raises(NotFoundError):
        await keys.create_key(db, "nobody")
    with pytest.raises(InvalidError):
        await keys.create_key(db, "alice", budget=(1.0, "fortnight"))
    with pytest.raises(InvalidError):
        await keys.create_key(db, "alice", expires_in=timedelta(0))


async def test_mark_used(db: Database) -> None:
    await users.create_user(db, "alice")
    a, _ = await keys.create_key(db, "alice")
    b, _ = await keys.create_key(db, "alice")
    await keys.mark_used(db, {a.id: T0, b.id: T0 + timedelta(hours=1)})
    await keys.mark_used(db, {})
    async with db.session() as s:
        used = dict((await s.execute(select(ApiKey.id, ApiKey.last_used_at))).all())
    assert {k: as_utc(v) for k, v in used.items() if v} == {a.id: T0, b.id: T0 + timedelta(hours=1)}


async def test_delete_user_removes_its_keys_and_budgets(db: Database) -> None:
    await users.create_user(db, "alice")
    await keys.create_key(db, "alice", budget=(5.0, "day"))
    await budgets.set_budget(db, "user", "alice", 10.0, "week")
    await users.delete_user(db, "alice")
    assert await keys.list_keys(db, include_revoked=True) == []
    assert await budgets.list_budgets(db) == []


@pytest.mark.parametrize(
    ("period", "start", "reset"),
    [
        ("day", datetime(2025, 3, 5, tzinfo=UTC), datetime(2025, 3, 6, tzinfo=UTC)),
        ("week", datetime(2025, 3, 3, tzinfo=UTC), datetime(2025, 3, 10, tzinfo=UTC)),
        ("month", datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)),
        ("total", None, None),
    ],
)
def test_period_boundaries(period: str, start: datetime | None, reset: datetime | None) -> None:
    assert budgets.period_start(period, T0) == start
    assert budgets.next_reset(period, T0) == reset


def test_period_edges() -> None:
    dec = datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert budgets.next_reset("month", dec) == datetime(2026, 1, 1, tzinfo=UTC)
    monday = datetime(2025, 3, 3, 0, 0, tzinfo=UTC)
    assert budgets.period_start("week", monday) == monday
    sunday_late = datetime(2025, 3, 9, 23, 59, tzinfo=UTC)
    assert budgets.period_start("week", sunday_late) == monday
    assert budgets.period_start("day", datetime(2025, 3, 5, 1, 0)) == datetime(
        2025, 3, 5, tzinfo=UTC
    )
    with pytest.raises(InvalidError):
        budgets.period_start("year", T0)


def _record(n: int, **fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "request_id": f"req-{n}",
        "created_at": T0,
        "model": "gpt-4o",
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "cost": 0.5,
        "latency_ms": 1.0,
        "streamed": False,
        "estimated": False,
        "cache_hit": False,
    }
    return UsageRecord(**(values | fields))


async def test_budgets_and_spent(db: Database) -> None:
    await users.create_team(db, "ml")
    await users.create_user(db, "alice", team="ml")
    row, _ = await keys.create_key(db, "alice")
    b = await budgets.set_budget(db, "team", "ml", 100.0, "month")
    assert (await budgets.set_budget(db, "team", "ml", 50.0, "week")).amount == 50.0
    assert [x.name for x in await budgets.list_budgets(db, "team")] == ["ml"]
    async with db.session() as s, s.begin():
        s.add_all(
            [
                _record(1, key_id=row.id, team_id=b.scope_id, cost=1.25),
                _record(2, key_id=row.id, cost=2.0, created_at=T0 - timedelta(days=40)),
            ]
        )
    assert await budgets.spent(db, "key", row.id, None) == 3.25
    assert await budgets.spent(db, "key", row.id, budgets.period_start("month", T0)) == 1.25
    assert await budgets.spent(db.engine, "team", b.scope_id, None) == 1.25
    await budgets.delete_budget(db, "team", "ml")
    with pytest.raises(NotFoundError):
        await budgets.get_budget(db, "team", "ml")
    with pytest.raises(NotFoundError):
        await budgets.set_budget(db, "user", "nobody", 1.0, "day")
    with pytest.raises(InvalidError):
        await budgets.set_budget(db, "user", "alice", -1.0, "day")


async def test_prices(db: Database) -> None:
    await prices.set_price(db, "openai/gpt-4o", 2.5, 10.0, 1.25)
    await prices.set_price(db, "openai/gpt-4o", 3.0, 12.0)
    p = await prices.get_price(db, "openai/gpt-4o")
    assert (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) == (3.0, 12.0, None)
    assert [x.model for x in await prices.list_prices(db)] == ["openai/gpt-4o"]
    await prices.delete_price(db, "openai/gpt-4o")
    with pytest.raises(NotFoundError):
        await prices.get_price(db, "openai/gpt-4o")
    with pytest.raises(InvalidError):
        await prices.set_price(db, "m", -1, 0)


async def test_usage_report(db: Database) -> None:
    await users.create_team(db, "ml")
    alice = await users.create_user(db, "alice", team="ml")
    bob = await users.create_user(db, "bob")
    ka, _ = await keys.create_key(db, "alice", name="laptop")
    team_id = (await users.list_teams(db))[0].id
    async with db.session() as s, s.begin():
        s.add_all(
            [
                _record(1, user_id=alice.id, team_id=team_id, key_id=ka.id, cached_tokens=4),
                _record(
                    2,
                    user_id=alice.id,
                    team_id=team_id,
                    key_id=ka.id,
                    status=502,
                    error_type="upstream_error",
                    cost=0.0,
                    estimated=True,
                ),
                _record(3, user_id=bob.id, model="llama", cost=2.0, reasoning_tokens=7),
                _record(4, user_id=bob.id, created_at=T0 - timedelta(days=1)),
                _record(5, user_id=999, created_at=T0 + timedelta(hours=1)),
            ]
        )
    since, until = T0, T0 + timedelta(minutes=30)
    by_user = await reports.usage_report(db, "user", since, until)
    assert [(r.name, r.requests, r.cost) for r in by_user] == [("bob", 1, 2.0), ("alice", 2, 0.5)]
    a = by_user[1]
    assert (a.prompt_tokens, a.completion_tokens, a.cached_tokens) == (20, 10, 4)
    assert (a.errors, a.estimated, a.id) == (1, 1, alice.id)
    assert by_user[0].reasoning_tokens == 7
    by_team = await reports.usage_report(db, "team", since, until)
    assert [(r.name, r.requests) for r in by_team] == [("(no team)", 1), ("ml", 2)]
    [_, by_key] = await reports.usage_report(db, "key", since, until)
    assert (by_key.name, by_key.key_name) == (ka.prefix, "laptop")
    by_model = await reports.usage_report(db, "model", since)
    assert {r.name: r.requests for r in by_model} == {"llama": 1, "gpt-4o": 3}
    deleted = await reports.usage_report(db, "user", T0 + timedelta(minutes=59))
    assert deleted[0].name == "(deleted user #999)"
    csv = reports.report_csv(by_user)
    assert csv.splitlines()[0].startswith("name,requests,prompt_tokens")
    assert csv.splitlines()[1].startswith("bob,1,")
    with pytest.raises(InvalidError):
        await reports.usage_report(db, "planet", since)


def test_durations() -> None:
    assert parse_duration("180d") == timedelta(days=180)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("30m") == timedelta(minutes=30)
    assert parse_time("12h", T0) == T0 - timedelta(hours=12)
    assert parse_time("2025-01-31", T0) == datetime(2025, 1, 31, tzinfo=UTC)
    for bad in ("0d", "5y", "soon"):
        with pytest.raises(InvalidError):
            parse_time(bad, T0)


async def test_foreign_keys_are_enforced(db: Database) -> None:
    with pytest.raises(Exception, match=r"(?i)foreign key"):
        async with db.session() as s, s.begin():
            await s.execute(
                text(
                    "INSERT INTO api_keys (prefix, secret_hash, name, user_id, created_at, "
                    "log_bodies, updated_at) VALUES ('p', 'h', '', 42, :t, false, :t)"
                ),
                {"t": T0},
            )
