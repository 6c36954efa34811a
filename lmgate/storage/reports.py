"""Usage reports: the ledger summed by user, team, key or model over a time range."""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from lmgate.storage.db import Database
from lmgate.storage.errors import InvalidError
from lmgate.storage.models import ApiKey, Team, UsageRecord, User
from lmgate.storage.timeutil import as_utc

GROUPS = ("user", "team", "key", "model")
_GROUP_COLUMN = {
    "user": UsageRecord.user_id,
    "team": UsageRecord.team_id,
    "key": UsageRecord.key_id,
    "model": UsageRecord.model,
}


@dataclass(frozen=True)
class UsageRow:
    """One group's totals; `name` is the user's, team's or model's name or the key's prefix."""

    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: float
    errors: int
    estimated: int
    id: int | None = None
    key_name: str | None = None


async def usage_report(
    db: Database, by: str, since: datetime, until: datetime | None = None
) -> list[UsageRow]:
    """Totals per group for records created in [since, until), most expensive first."""
    if by not in GROUPS:
        raise InvalidError(f"invalid grouping {by!r}: expected one of {', '.join(GROUPS)}", "by")
    group = _GROUP_COLUMN[by]
    failed = or_(UsageRecord.status >= 400, UsageRecord.error_type.is_not(None))
    query = (
        select(
            group,
            func.count(),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
            func.sum(UsageRecord.cached_tokens),
            func.sum(UsageRecord.reasoning_tokens),
            func.sum(UsageRecord.cost),
            func.sum(case((failed, 1), else_=0)),
            func.sum(UsageRecord.estimated.cast(Integer)),
        )
        .where(UsageRecord.created_at >= as_utc(since))
        .group_by(group)
    )
    if until is not None:
        query = query.where(UsageRecord.created_at < as_utc(until))
    async with db.session() as s:
        rows = (await s.execute(query)).all()
        names = await _names(s, by, {r[0] for r in rows if r[0] is not None})
    report = [_row(by, r, names) for r in rows]
    return sorted(report, key=lambda r: (-r.cost, r.name))


def _row(by: str, r: Any, names: dict[Any, tuple[str, str | None]]) -> UsageRow:
    ident = r[0]
    if by == "model":
        name, key_name = str(ident), None
    elif ident is None:
        name, key_name = f"(no {by})", None
    else:
        name, key_name = names.get(ident, (f"(deleted {by} #{ident})", None))
    return UsageRow(
        name=name,
        requests=int(r[1]),
        prompt_tokens=int(r[2] or 0),
        completion_tokens=int(r[3] or 0),
        cached_tokens=int(r[4] or 0),
        reasoning_tokens=int(r[5] or 0),
        cost=float(r[6] or 0.0),
        errors=int(r[7] or 0),
        estimated=int(r[8] or 0),
        id=None if by == "model" else ident,
        key_name=key_name,
    )


async def _names(s: AsyncSession, by: str, ids: set[Any]) -> dict[Any, tuple[str, str | None]]:
    """Display names of the ids in a report: users', teams', or keys' prefix and name."""
    if by == "model" or not ids:
        return {}
    if by == "key":
        rows = await s.execute(
            select(ApiKey.id, ApiKey.prefix, ApiKey.name).where(ApiKey.id.in_(ids))
        )
        return {i: (prefix, name) for i, prefix, name in rows}
    table = User if by == "user" else Team
    named = select(table.id, table.name).where(table.id.in_(ids))
    return {i: (name, None) for i, name in (await s.execute(named)).all()}


def report_csv(rows: list[UsageRow]) -> str:
    """A usage report as CSV, with a header line."""
    out = io.StringIO()
    fields = [f.name for f in dataclasses.fields(UsageRow)]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
    return out.getvalue()
