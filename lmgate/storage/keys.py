"""Virtual keys: `lmg-` and 40 random characters; only a sha256 and a prefix are stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lmgate.storage.budgets import PERIODS, upsert_budget
from lmgate.storage.db import Database
from lmgate.storage.errors import InvalidError, NotFoundError
from lmgate.storage.models import ApiKey, User
from lmgate.storage.timeutil import as_utc, maybe_utc, utcnow
from lmgate.storage.users import user_row

KEY_PREFIX = "lmg-"
PREFIX_LEN = 12


@dataclass(frozen=True)
class KeyView:
    """A key as shown to administrators: never its secret nor its hash."""

    id: int
    prefix: str
    name: str
    user: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    allowed_models: list[str] | None
    log_bodies: bool
    last_used_at: datetime | None
    updated_at: datetime

    @property
    def status(self) -> str:
        """`active`, `revoked` or `expired`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"


def generate_key() -> str:
    """A new random key: `lmg-` and 40 URL-safe characters (240 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(30)


def hash_key(secret: str) -> str:
    """The stored form of a key: its sha256, in hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _view(key: ApiKey, user: str) -> KeyView:
    return KeyView(
        id=key.id,
        prefix=key.prefix,
        name=key.name,
        user=user,
        created_at=as_utc(key.created_at),
        expires_at=maybe_utc(key.expires_at),
        revoked_at=maybe_utc(key.revoked_at),
        allowed_models=key.allowed_models,
        log_bodies=key.log_bodies,
        last_used_at=maybe_utc(key.last_used_at),
        updated_at=as_utc(key.updated_at),
    )


async def create_key(
    db: Database,
    user: str,
    name: str = "",
    expires_in: timedelta | None = None,
    models: list[str] | None = None,
    budget: tuple[float, str] | None = None,
    log_bodies: bool = False,
    limits: dict[str, int] | None = None,
) -> tuple[ApiKey, str]:
    """A new key for `user` and its secret, which is returned here once and never stored."""
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidError("expires_in must be positive", "expires_in")
    if budget is not None and budget[1] not in PERIODS:
        raise InvalidError(f"invalid period {budget[1]!r}", "budget.period")
    models = [m.strip() for m in models if m.strip()] if models is not None else None
    async with db.session() as s, s.begin():
        owner = await user_row(s, user)
        secret = await _unused_secret(s)
        now = utcnow()
        key = ApiKey(
            prefix=secret[:PREFIX_LEN],
            secret_hash=hash_key(secret),
            name=name,
            user_id=owner.id,
            created_at=now,
            expires_at=now + expires_in if expires_in else None,
            allowed_models=models or None,
            log_bodies=log_bodies,
            limits=limits or None,
            updated_at=now,
        )
        s.add(key)
        await s.flush()
        if budget is not None:
            await upsert_budget(s, "key", key.id, budget[0], budget[1])
    return key, secret


async def _unused_secret(s: AsyncSession) -> str:
    """A new key whose prefix no stored key has."""
    while True:
        secret = generate_key()
        if await s.scalar(select(ApiKey.id).where(ApiKey.prefix == secret[:PREFIX_LEN])) is None:
            return secret


async def list_keys(
    db: Database, user: str | None = None, include_revoked: bool = False
) -> list[KeyView]:
    """Keys, newest first: every user's or one user's, revoked ones only if asked."""
    query = select(ApiKey, User.name).join(User, ApiKey.user_id == User.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    async with db.session() as s:
        if user is not None:
            query = query.where(ApiKey.user_id == (await user_row(s, user)).id)
        rows = (await s.execute(query.order_by(ApiKey.id.desc()))).all()
    return [_view(k, u) for k, u in rows]


async def get_key(db: Database, prefix: str) -> KeyView:
    """One key by its prefix."""
    query = select(ApiKey, User.name).join(User, ApiKey.user_id == User.id)
    async with db.session() as s:
        row = (await s.execute(query.where(ApiKey.prefix == prefix))).first()
    if row is None:
        raise NotFoundError(f"no key with prefix {prefix!r}", "prefix")
    return _view(row[0], row[1])


async def key_row(s: AsyncSession, prefix: str) -> ApiKey:
    """The key with `prefix`, or NotFoundError."""
    key = await s.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise NotFoundError(f"no key with prefix {prefix!r}", "prefix")
    return key


async def revoke_key(db: Database, prefix: str) -> KeyView:
    """Revoke a key (idempotent: a revoked key keeps its first revocation time)."""
    async with db.session() as s, s.begin():
        key = await key_row(s, prefix)
        if key.revoked_at is None:
            key.revoked_at = key.updated_at = utcnow()
    return await get_key(db, prefix)


async def find_key(db: Database, secret: str) -> ApiKey | None:
    """The key row whose hash matches `secret`, revoked or not; None if there is none."""
    async with db.session() as s:
        return await s.scalar(select(ApiKey).where(ApiKey.secret_hash == hash_key(secret)))


async def mark_used(db: Database, key_ids: dict[int, datetime]) -> None:
    """Record when keys were last used, in one transaction; does not bump `updated_at`."""
    if not key_ids:
        return
    rows = [{"id": key_id, "last_used_at": when} for key_id, when in sorted(key_ids.items())]
    async with db.session() as s, s.begin():
        await s.execute(update(ApiKey), rows)
