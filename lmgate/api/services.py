"""The stateful parts a gateway opens at start: database, key cache, accounting, admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from lmgate.accounting.budgets import BudgetBook
from lmgate.accounting.ledger import Ledger, purge_bodies
from lmgate.accounting.metering import Accounting
from lmgate.accounting.prices import PriceBook, load_overrides
from lmgate.accounting.shared_budgets import SharedTotals
from lmgate.api.http import Receive, Scope, Send
from lmgate.auth.keys import KeyCache
from lmgate.config.schema import GatewayConfig
from lmgate.limits.limiter import Limiter
from lmgate.limits.redis_backend import RedisWindows
from lmgate.storage.db import Database, database_url

log = logging.getLogger("lmgate")
_PURGE_EVERY = 3600.0


@dataclass
class Services:
    """What `startup` opened; each part is None when the configuration turns it off."""

    db: Database | None = None
    keys: KeyCache | None = None
    accounting: Accounting | None = None
    limiter: Limiter | None = None
    admin: object | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def admin_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The admin API (an ASGI app), mounted under `/admin`."""
        assert self.admin is not None
        await self.admin(scope, receive, send)  # type: ignore[operator]

    async def close(self) -> None:
        """Flush the ledger and close everything, newest first."""
        for task in self._tasks:
            task.cancel()
        if self.accounting is not None:
            await self.accounting.ledger.close()
            await self.accounting.budgets.close()
        if self.keys is not None:
            await self.keys.close()
        if self.limiter is not None and self.limiter.redis is not None:
            await self.limiter.redis.close()
        if self.db is not None:
            await self.db.close()


async def open_services(config: GatewayConfig) -> Services:
    """Open the database (migrating it) and the parts that use it, as configured."""
    services = Services()
    limits = config.limits
    if config.auth.enabled or limits.model or limits.key or limits.user or limits.team:
        redis = RedisWindows.from_url(limits.redis_url) if limits.redis_url else None
        services.limiter = Limiter(limits, redis)
    if not (config.auth.enabled or config.accounting.enabled):
        return services
    db = Database(database_url(config))
    services.db = db
    if config.database.migrate_on_start:
        await db.upgrade()
    if config.auth.enabled:
        services.keys = KeyCache(db, config.auth.refresh_interval)
        await services.keys.start()
    if config.accounting.enabled:
        services.accounting = await _open_accounting(config, db, services)
    admin_key = config.auth.admin_key.get_secret_value() if config.auth.admin_key else None
    from lmgate.admin.api import build_admin_app  # FastAPI loads only where it is used

    services.admin = build_admin_app(db, admin_key or os.environ.get("LMGATE_ADMIN_KEY"))
    log.info("database: %s", db.safe_url)
    return services


async def _open_accounting(config: GatewayConfig, db: Database, services: Services) -> Accounting:
    acc = config.accounting
    limits = config.limits
    shared = SharedTotals.from_url(limits.redis_url) if limits.redis_url else None
    budgets = BudgetBook(db.engine, shared=shared, fail_closed=limits.on_redis_failure == "closed")
    await budgets.start()
    prices = PriceBook(acc.prices, await load_overrides(db.engine))
    spool = Path(acc.spool_path) if acc.spool_path else config.base_dir / "lmgate-ledger.spool"
    if not spool.is_absolute():
        spool = config.base_dir / spool
    ledger = Ledger(
        db, spool_path=spool, flush_interval=acc.flush_interval, batch_size=acc.batch_size
    )
    await ledger.start()
    retention = timedelta(days=acc.body_log_retention_days)
    services._tasks.append(asyncio.create_task(_purge_loop(db, retention)))
    return Accounting(prices, budgets, ledger, acc.default_max_tokens)


async def _purge_loop(db: Database, retention: timedelta) -> None:
    """Delete logged bodies older than the retention period, hourly."""
    while True:
        with contextlib.suppress(Exception):
            await purge_bodies(db.engine, retention)
        await asyncio.sleep(_PURGE_EVERY)
