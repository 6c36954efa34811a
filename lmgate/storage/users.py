"""Users and teams: create, list, read, update, delete."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lmgate.storage.db import Database
from lmgate.storage.errors import ConflictError, InvalidError, NotFoundError
from lmgate.storage.models import ApiKey, Budget, Team, User
from lmgate.storage.timeutil import as_utc, utcnow

ROLES = ("admin", "user")


@dataclass(frozen=True)
class UserView:
    """A user with its team's name."""

    id: int
    name: str
    email: str | None
    role: str
    team: str | None
    disabled: bool
    log_bodies: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TeamView:
    """A team and how many users belong to it."""

    id: int
    name: str
    members: int
    created_at: datetime


def _view(user: User, team: str | None) -> UserView:
    return UserView(
        id=user.id,
        name=user.name,
        email=user.email,
        role=user.role,
        team=team,
        disabled=user.disabled,
        log_bodies=user.log_bodies,
        created_at=as_utc(user.created_at),
        updated_at=as_utc(user.updated_at),
    )


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}", "role")


async def user_row(s: AsyncSession, name: str) -> User:
    """The user called `name`, or NotFoundError."""
    user = await s.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFoundError(f"no user named {name!r}", "user")
    return user


async def team_row(s: AsyncSession, name: str) -> Team:
    """The team called `name`, or NotFoundError."""
    team = await s.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise NotFoundError(f"no team named {name!r}: create it first", "team")
    return team


async def create_team(db: Database, name: str) -> TeamView:
    """A new team; ConflictError if the name is taken."""
    name = _clean_name(name)
    async with db.session() as s, s.begin():
        if await s.scalar(select(Team.id).where(Team.name == name)) is not None:
            raise ConflictError(f"a team named {name!r} already exists", "name")
        team = Team(name=name, created_at=utcnow())
        s.add(team)
        await s.flush()
        return TeamView(team.id, team.name, 0, as_utc(team.created_at))


async def list_teams(db: Database) -> list[TeamView]:
    """Every team, by name, with its member count."""
    count = func.count(User.id)
    query = (
        select(Team, count).outerjoin(User, User.team_id == Team.id).group_by(Team.id)
    ).order_by(Team.name)
    async with db.session() as s:
        rows = (await s.execute(query)).all()
    return [TeamView(t.id, t.name, int(n), as_utc(t.created_at)) for t, n in rows]


async def delete_team(db: Database, name: str) -> None:
    """Delete a team and its budget; its members stay, without a team."""
    async with db.session() as s, s.begin():
        team = await team_row(s, name)
        await s.execute(
            update(User).where(User.team_id == team.id).values(team_id=None, updated_at=utcnow())
        )
        await s.execute(delete(Budget).where(Budget.scope == "team", Budget.scope_id == team.id))
        await s.delete(team)


async def team_members(db: Database, name: str) -> list[UserView]:
    """The users of a team, by name."""
    async with db.session() as s:
        team = await team_row(s, name)
        users = await s.scalars(select(User).where(User.team_id == team.id).order_by(User.name))
        return [_view(u, team.name) for u in users]


async def create_user(
    db: Database,
    name: str,
    *,
    email: str | None = None,
    role: str = "user",
    team: str | None = None,
    log_bodies: bool = False,
) -> UserView:
    """A new user; the team, if given, must exist."""
    name = _clean_name(name)
    _check_role(role)
    async with db.session() as s, s.begin():
        if await s.scalar(select(User.id).where(User.name == name)) is not None:
            raise ConflictError(f"a user named {name!r} already exists", "name")
        team_id = (await team_row(s, team)).id if team else None
        now = utcnow()
        user = User(
            name=name,
            email=email,
            role=role,
            team_id=team_id,
            created_at=now,
            updated_at=now,
            disabled=False,
            log_bodies=log_bodies,
        )
        s.add(user)
        await s.flush()
        return _view(user, team)


async def list_users(db: Database, team: str | None = None) -> list[UserView]:
    """Every user (or a team's), by name."""
    query = select(User, Team.name).outerjoin(Team, User.team_id == Team.id).order_by(User.name)
    if team is not None:
        query = query.where(Team.name == team)
    async with db.session() as s:
        if team is not None:
            await team_row(s, team)
        rows = (await s.execute(query)).all()
    return [_view(u, t) for u, t in rows]


async def get_user(db: Database, name: str) -> UserView:
    """One user by name."""
    query = select(User, Team.name).outerjoin(Team, User.team_id == Team.id)
    async with db.session() as s:
        row = (await s.execute(query.where(User.name == name))).first()
    if row is None:
        raise NotFoundError(f"no user named {name!r}", "user")
    return _view(row[0], row[1])


_UNSET: Any = object()


async def update_user(
    db: Database,
    name: str,
    *,
    role: str | None = None,
    team: str | None = _UNSET,
    email: str | None = _UNSET,
    disabled: bool | None = None,
    log_bodies: bool | None = None,
) -> UserView:
    """Change some of a user's fields; `team=None` removes the user from its team."""
    async with db.session() as s, s.begin():
        user = await user_row(s, name)
        if role is not None:
            _check_role(role)
            user.role = role
        if team is not _UNSET:
            user.team_id = (await team_row(s, team)).id if team else None
        if email is not _UNSET:
            user.email = email
        if disabled is not None:
            user.disabled = disabled
        if log_bodies is not None:
            user.log_bodies = log_bodies
        user.updated_at = utcnow()
    return await get_user(db, name)


async def delete_user(db: Database, name: str) -> None:
    """Delete a user, its keys and their budgets; the ledger keeps the user's id."""
    async with db.session() as s, s.begin():
        user = await user_row(s, name)
        key_ids = select(ApiKey.id).where(ApiKey.user_id == user.id).scalar_subquery()
        await s.execute(delete(Budget).where(Budget.scope == "key", Budget.scope_id.in_(key_ids)))
        await s.execute(delete(Budget).where(Budget.scope == "user", Budget.scope_id == user.id))
        await s.execute(delete(ApiKey).where(ApiKey.user_id == user.id))
        await s.delete(user)


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidError("a name must have 1 to 200 characters", "name")
    return name
