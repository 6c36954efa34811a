"""UTC times and the durations used on the command line and in the admin API (`30d`, `12h`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from lmgate.storage.errors import InvalidError

_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def as_utc(dt: datetime) -> datetime:
    """`dt` as an aware UTC time; naive times (as SQLite returns them) are taken as UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def maybe_utc(dt: datetime | None) -> datetime | None:
    """`as_utc` that lets None through."""
    return None if dt is None else as_utc(dt)


def parse_duration(text: str, param: str | None = None) -> timedelta:
    """`180d`, `12h`, `30m`, `2w` or `45s` as a timedelta."""
    m = _DURATION.match(text)
    if not m or int(m.group(1)) == 0:
        raise InvalidError(
            f"invalid duration {text!r}: expected a positive number and a unit among s, m, h, d, w"
            " (e.g. 30d)",
            param,
        )
    return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})


def parse_time(text: str, now: datetime | None = None, param: str | None = None) -> datetime:
    """A duration ago (`30d`) or an ISO date or time (UTC when it names no zone)."""
    if _DURATION.match(text):
        return (now or utcnow()) - parse_duration(text, param)
    try:
        return as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise InvalidError(
            f"invalid time {text!r}: expected a duration such as 30d or an ISO date such as "
            "2025-01-31",
            param,
        ) from None
