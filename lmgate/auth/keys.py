"""Virtual keys on the hot path: who is calling, from a cache that follows the database.

A key already seen costs one sha256 and a dict lookup. Keys created, changed or revoked
anywhere (another replica, the CLI, the admin API) are picked up by polling `updated_at`
every `refresh_interval` seconds, so a revocation takes effect within about that time.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select

from lmgate.api.errors import GatewayError
from lmgate.storage.db import Database
from lmgate.storage.keys import KEY_PREFIX, mark_used
from lmgate.storage.models import ApiKey, Team, User

log = logging.getLogger("lmgate.auth")

_OVERLAP = timedelta(seconds=5)
"""Re-read rows changed a little before the last poll: replicas' clocks differ slightly."""
_NEGATIVE_TTL = 1.0
_FULL_CHECK_EVERY = 4
"""Polls between checks for deleted keys, which leave no `updated_at` behind."""
_MAX_NEGATIVE = 10_000


@dataclass(slots=True, eq=False)
class Principal:
    """The owner of a valid key, as the hot path needs it."""

    key_id: int
    prefix: str
    secret_hash: str
    user_id: int
    user_name: str
    team_id: int | None
    team_name: str | None
    expires_at: float | None
    allowed_models: tuple[str, ...] | None
    log_bodies: bool
    limits: dict[str, Any] | None
    _allowed: dict[str, bool] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        """Whether the key's model list (names or `*` patterns) admits `model`."""
        if self.allowed_models is None:
            return True
        ok = self._allowed.get(model)
        if ok is None:
            ok = any(fnmatch.fnmatchcase(model, p) for p in self.allowed_models)
            if len(self._allowed) < 1024:
                self._allowed[model] = ok
        return ok


def invalid_key(message: str = "Invalid API key.") -> GatewayError:
    return GatewayError(401, message, code="invalid_api_key", type="invalid_request_error")


class KeyCache:
    """Every valid key by hash, kept current by a background poller."""

    def __init__(self, db: Database, refresh_interval: float = 0.5) -> None:
        self.db = db
        self.engine = db.reader
        self.refresh_interval = refresh_interval
        self._by_hash: dict[str, Principal] = {}
        self._by_id: dict[int, Principal] = {}
        self._negative: dict[str, float] = {}
        self._used: dict[int, datetime] = {}
        self._watermark: datetime | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load every key, then follow changes in the background."""
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        """Stop polling and record when keys were last used."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self._flush_used()

    async def authenticate(self, secret: bytes | None) -> Principal:
        """The principal for `secret`; 401 `invalid_api_key` when missing, unknown or expired."""
        if not secret:
            raise invalid_key(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`."
            )
        digest = hashlib.sha256(secret).hexdigest()  # as storage.keys.hash_key, without decoding
        principal = self._by_hash.get(digest)
        if principal is None:
            principal = await self._lookup(digest)
        if principal is None or not hmac.compare_digest(principal.secret_hash, digest):
            raise invalid_key(_unknown_message(secret))
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise invalid_key(f"The API key {principal.prefix}… has expired.")
        self._used[principal.key_id] = _now()
        return principal

    async def _lookup(self, digest: str) -> Principal | None:
        """A key not in the cache: ask the database once, remember misses briefly."""
        now = time.monotonic()
        if self._negative.get(digest, 0.0) > now:
            return None
        try:
            found = await self._select(ApiKey.secret_hash == digest)
        except Exception as e:  # the database is down: known keys still work, new ones wait
            log.warning("key lookup failed: %s", type(e).__name__)
            raise GatewayError(
                503,
                "This API key cannot be checked right now; try again shortly.",
                code="auth_unavailable",
                headers={"Retry-After": "5"},
            ) from None
        for principal, alive in found:
            if alive:
                self._store(principal, alive)
                return principal
        if len(self._negative) >= _MAX_NEGATIVE:
            self._negative.clear()
        self._negative[digest] = now + _NEGATIVE_TTL
        return None

    async def refresh(self) -> None:
        """Apply every key and user change since the last poll."""
        since = self._watermark
        started = _now()
        cond = None if since is None else or_(ApiKey.updated_at > since, User.updated_at > since)
        for principal, alive in await self._select(cond):
            self._store(principal, alive)
        self._watermark = started - _OVERLAP

    def _store(self, principal: Principal, alive: bool) -> None:
        """Add, replace or (revoked key, disabled user) drop a key."""
        old = self._by_id.pop(principal.key_id, None)
        if old is not None:
            self._by_hash.pop(old.secret_hash, None)
        if alive:
            self._by_id[principal.key_id] = principal
            self._by_hash[principal.secret_hash] = principal
            self._negative.pop(principal.secret_hash, None)

    async def _select(self, cond: Any) -> list[tuple[Principal, bool]]:
        """Keys matching `cond`, each with whether it may still be used."""
        query = (
            select(
                ApiKey.id,
                ApiKey.prefix,
                ApiKey.secret_hash,
                ApiKey.user_id,
                User.name,
                User.team_id,
                Team.name.label("team_name"),
                ApiKey.expires_at,
                ApiKey.allowed_models,
                ApiKey.log_bodies.label("key_log_bodies"),
                User.log_bodies.label("user_log_bodies"),
                ApiKey.limits,
                ApiKey.revoked_at,
                User.disabled,
            )
            .join(User, User.id == ApiKey.user_id)
            .outerjoin(Team, Team.id == User.team_id)
        )
        if cond is not None:
            query = query.where(cond)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        out = []
        for r in rows:
            principal = Principal(
                key_id=r.id,
                prefix=r.prefix,
                secret_hash=r.secret_hash,
                user_id=r.user_id,
                user_name=r.name,
                team_id=r.team_id,
                team_name=r.team_name,
                expires_at=_epoch(r.expires_at),
                allowed_models=tuple(r.allowed_models) if r.allowed_models else None,
                log_bodies=bool(r.key_log_bodies or r.user_log_bodies),
                limits=r.limits,
            )
            out.append((principal, r.revoked_at is None and not r.disabled))
        return out

    async def _drop_deleted(self) -> None:
        """Forget keys whose rows are gone (a deleted user takes its keys along)."""
        async with self.engine.connect() as conn:
            ids = set((await conn.execute(select(ApiKey.id))).scalars())
        for key_id in set(self._by_id) - ids:
            principal = self._by_id.pop(key_id)
            self._by_hash.pop(principal.secret_hash, None)

    async def _poll(self) -> None:
        last_flush = time.monotonic()
        polls = 0
        while True:
            await asyncio.sleep(self.refresh_interval)
            polls += 1
            try:
                await self.refresh()
                if polls % _FULL_CHECK_EVERY == 0:
                    await self._drop_deleted()
                if time.monotonic() - last_flush > 10:
                    await self._flush_used()
                    last_flush = time.monotonic()
            except Exception as e:  # the database may be down: keep serving from the cache
                log.warning("key refresh failed: %s", type(e).__name__)

    async def _flush_used(self) -> None:
        """Write `last_used_at` for keys used since the last flush."""
        used, self._used = self._used, {}
        try:
            await mark_used(self.db, used)
        except Exception as e:
            log.warning("could not record key use: %s", type(e).__name__)


def _unknown_message(secret: bytes) -> str:
    ours = secret.startswith(KEY_PREFIX.encode())
    shown = secret[:12].decode("ascii", "replace") if ours else "****"
    return f"Incorrect API key provided: {shown}…. Ask your lmgate administrator for a key."


def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes: they were stored as UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _now() -> datetime:
    return datetime.now(UTC)
