"""Budgets for a key, a user or a team, their periods in UTC, and what was spent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from lmgate.storage.db import Database
from lmgate.storage.errors import InvalidError, NotFoundError
from lmgate.storage.models import ApiKey, Budget, Team, UsageRecord, User
from lmgate.storage.timeutil import as_utc, utcnow

SCOPES = ("key", "user", "team")
PERIODS = ("day", "week", "month", "total")
_REF_COLUMNS = {
    "key": (ApiKey.id, ApiKey.prefix),
    "user": (User.id, User.name),
    "team": (Team.id, Team.name),
}


@dataclass(frozen=True)
class BudgetView:
    """A budget, named by the user's or team's name or the key's prefix."""

    scope: str
    name: str
    scope_id: int
    amount: float
    period: str
    updated_at: datetime


def period_start(period: str, now: datetime) -> datetime | None:
    """When the current period began (UTC; weeks start on Monday); None for `total`."""
    now = as_utc(now)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    if period == "total":
        return None
    raise InvalidError(f"invalid period {period!r}: expected one of {', '.join(PERIODS)}", "period")


def next_reset(period: str, now: datetime) -> datetime | None:
    """When the next period begins; None for `total`, which never resets."""
    start = period_start(period, now)
    if start is None:
        return None
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(weeks=1)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month)


def _check(scope: str, amount: float | None = None, period: str | None = None) -> None:
    if scope not in SCOPES:
        raise InvalidError(f"invalid scope {scope!r}: expected one of {', '.join(SCOPES)}", "scope")
    if amount is not None and not amount >= 0:
        raise InvalidError("the amount must be zero or more (US dollars)", "amount")
    if period is not None:
        period_start(period, utcnow())


async def scope_id(s: AsyncSession, scope: str, ref: str) -> int:
    """The id of the user or team named `ref`, or of the key whose prefix is `ref`."""
    _check(scope)
    id_col, ref_col = _REF_COLUMNS[scope]
    found = await s.scalar(select(id_col).where(ref_col == ref))
    if found is None:
        what = "key with prefix" if scope == "key" else f"{scope} named"
        raise NotFoundError(f"no {what} {ref!r}", scope)
    return int(found)


async def upsert_budget(
    s: AsyncSession, scope: str, sid: int, amount: float, period: str
) -> Budget:
    """Create or replace the budget of (scope, id) inside the caller's transaction."""
    _check(scope, amount, period)
    now = utcnow()
    budget = await s.scalar(select(Budget).where(Budget.scope == scope, Budget.scope_id == sid))
    if budget is None:
        budget = Budget(scope=scope, scope_id=sid, created_at=now)
        s.add(budget)
    budget.amount, budget.period, budget.updated_at = amount, period, now
    await s.flush()
    return budget


async def set_budget(db: Database, scope: str, ref: str, amount: float, period: str) -> BudgetView:
    """Set the budget of a key (by prefix), a user or a team (by name)."""
    async with db.session() as s, s.begin():
        b = await upsert_budget(s, scope, await scope_id(s, scope, ref), amount, period)
        return BudgetView(scope, ref, b.scope_id, b.amount, b.period, as_utc(b.updated_at))


async def _budget_row(s: AsyncSession, scope: str, ref: str) -> Budget:
    sid = await scope_id(s, scope, ref)
    budget = await s.scalar(select(Budget).where(Budget.scope == scope, Budget.scope_id == sid))
    if budget is None:
        raise NotFoundError(f"{scope} {ref!r} has no budget", scope)
    return budget


async def get_budget(db: Database, scope: str, ref: str) -> BudgetView:
    """The budget of a key, a user or a team; NotFoundError if it has none."""
    async with db.session() as s:
        b = await _budget_row(s, scope, ref)
    return BudgetView(scope, ref, b.scope_id, b.amount, b.period, as_utc(b.updated_at))


async def delete_budget(db: Database, scope: str, ref: str) -> None:
    """Remove the budget of a key, a user or a team."""
    async with db.session() as s, s.begin():
        await s.delete(await _budget_row(s, scope, ref))


async def list_budgets(db: Database, scope: str | None = None) -> list[BudgetView]:
    """Every budget (or every budget of one scope), named."""
    query = select(Budget).order_by(Budget.scope, Budget.scope_id)
    if scope is not None:
        _check(scope)
        query = query.where(Budget.scope == scope)
    async with db.session() as s:
        budgets = list(await s.scalars(query))
        names = {
            "key": dict((await s.execute(select(ApiKey.id, ApiKey.prefix))).all()),
            "user": dict((await s.execute(select(User.id, User.name))).all()),
            "team": dict((await s.execute(select(Team.id, Team.name))).all()),
        }
    return [
        BudgetView(
            b.scope,
            names[b.scope].get(b.scope_id, f"#{b.scope_id}"),
            b.scope_id,
            b.amount,
            b.period,
            as_utc(b.updated_at),
        )
        for b in budgets
    ]


async def spent(
    db: Database | AsyncEngine, scope: str, scope_id: int, since: datetime | None
) -> float:
    """US dollars recorded in the ledger for a key, user or team since `since` (None: ever)."""
    _check(scope)
    column = {"key": UsageRecord.key_id, "user": UsageRecord.user_id, "team": UsageRecord.team_id}
    query = select(func.coalesce(func.sum(UsageRecord.cost), 0.0)).where(column[scope] == scope_id)
    if since is not None:
        query = query.where(UsageRecord.created_at >= as_utc(since))
    engine = db.engine if isinstance(db, Database) else db
    async with engine.connect() as conn:
        return float(await conn.scalar(query) or 0.0)
