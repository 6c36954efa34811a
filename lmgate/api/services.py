"""The stateful parts a gateway opens at start: database, keys, limits, accounting, metrics,
health checks and the admin API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from lmgate.accounting.budgets import BudgetBook
from lmgate.accounting.ledger import Ledger, LedgerEntry, purge_bodies
from lmgate.accounting.metering import Accounting, LedgerSink, Sink, drain, warm_tokenizer
from lmgate.accounting.prices import DatabasePrices, PriceBook
from lmgate.accounting.shared_budgets import SharedTotals
from lmgate.api.http import Receive, Scope, Send
from lmgate.auth.keys import KeyCache, Principal
from lmgate.backends.config import BackendConfig
from lmgate.backends.manager import BackendManager
from lmgate.config.schema import GatewayConfig, ProviderConfig
from lmgate.limits.limiter import Limiter
from lmgate.limits.redis_backend import RedisWindows
from lmgate.observability import Metrics, RequestLog
from lmgate.routing.deployment import Deployment
from lmgate.routing.health import HealthChecker
from lmgate.storage.db import Database, database_url
from lmgate.upstream.provider import Provider

log = logging.getLogger("lmgate")
_PURGE_EVERY = 3600.0
_PRICES_EVERY = 2.0
"""Seconds between checks of the `prices` table: a price set or removed through the admin API
applies within this time, in every gateway on the database."""


@dataclass
class Services:
    """What `startup` opened; each part is None when the configuration turns it off."""

    db: Database | None = None
    keys: KeyCache | None = None
    accounting: Accounting | None = None
    limiter: Limiter | None = None
    metrics: Metrics | None = None
    health: HealthChecker | None = None
    admin: object | None = None
    ledger: Ledger | None = None
    backends: BackendManager | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def admin_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The admin API (an ASGI app), mounted under `/admin`."""
        assert self.admin is not None
        await self.admin(scope, receive, send)  # type: ignore[operator]

    async def close(self) -> None:
        """Flush the ledger and close everything, newest first."""
        for task in self._tasks:
            task.cancel()
        if self.health is not None:
            await self.health.close()
        if self.backends is not None:
            await self.backends.close()
        if self.ledger is not None:
            await drain()
            await self.ledger.close()
        if self.accounting is not None and self.accounting.budgets is not None:
            await self.accounting.budgets.close()
        if self.keys is not None:
            await self.keys.close()
        if self.limiter is not None and self.limiter.redis is not None:
            await self.limiter.redis.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.db is not None:
            await self.db.close()


class MetricsSink:
    """Prometheus metrics as a sink."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def record(
        self, entry: LedgerEntry, principal: Principal | None, upstream_ms: float | None
    ) -> None:
        self.metrics.record(entry, upstream_ms)


class LogSink:
    """The request log as a sink."""

    def __init__(self, requests: RequestLog) -> None:
        self.requests = requests

    def record(
        self, entry: LedgerEntry, principal: Principal | None, upstream_ms: float | None
    ) -> None:
        p = principal
        self.requests.write(entry, p.user_name if p else None, p.prefix if p else None)


async def open_services(config: GatewayConfig, deployments: list[Deployment]) -> Services:
    """Open what the configuration asks for."""
    services = Services()
    obs = config.observability
    sinks: list[Sink] = []
    if obs.metrics:
        services.metrics = Metrics()
        sinks.append(MetricsSink(services.metrics))
    if obs.request_log:
        sinks.append(LogSink(RequestLog()))
    limits = config.limits
    shared_slots = limits.redis_url and any(d.max_inflight for d in deployments)
    if (
        config.auth.enabled
        or limits.model
        or limits.key
        or limits.user
        or limits.team
        or shared_slots
    ):
        redis = RedisWindows.from_url(limits.redis_url) if limits.redis_url else None
        services.limiter = Limiter(limits, redis)
    if config.routing.health_check_interval:
        services.health = _health_checker(config, deployments, services.metrics)
        await services.health.start()
    budgets = None
    prices = PriceBook(config.accounting.prices)
    managed = {m.name: m.backend for m in config.models if m.backend is not None}
    if config.auth.enabled or config.accounting.enabled or managed:
        db = services.db = Database(database_url(config))
        if config.database.migrate_on_start:
            await db.upgrade()
        if config.auth.enabled:
            services.keys = KeyCache(db, config.auth.refresh_interval)
            await services.keys.start()
        if config.accounting.enabled:
            budgets = await _open_budgets(config, db)
            services._tasks.append(await _follow_prices(prices, db))
            services.ledger = _ledger(config, db)
            await services.ledger.start()
            sinks.insert(0, LedgerSink(services.ledger))
            retention = timedelta(days=config.accounting.body_log_retention_days)
            services._tasks.append(asyncio.create_task(_purge_loop(db, retention)))
        services.admin = _admin_app(config, db)
        log.info("database: %s", db.safe_url)
        if managed:
            services.backends = _backend_manager(config, managed, db)
            await services.backends.start()
    if sinks or budgets is not None:
        warm = asyncio.get_running_loop().run_in_executor(None, warm_tokenizer)
        services._tasks.append(asyncio.ensure_future(warm))
        services.accounting = Accounting(
            prices, budgets, sinks, config.accounting.default_max_tokens
        )
    return services


def _backend_manager(
    config: GatewayConfig, managed: dict[str, BackendConfig], db: Database
) -> BackendManager:
    """The manager of the models lmgate launches; workers reach it at `backends.public_url`."""
    s = config.server

    def instance(url: str, upstream_model: str) -> Deployment:
        provider = Provider(f"worker@{url}", ProviderConfig(base_url=url, wildcard=False))
        return Deployment(provider, upstream_model)

    return BackendManager(
        managed,
        config.backends,
        db,
        instance,
        gateway_url=config.backends.public_url or f"http://{s.host}:{s.port}",
        base_dir=config.base_dir,
    )


def _health_checker(
    config: GatewayConfig, deployments: list[Deployment], metrics: Metrics | None
) -> HealthChecker:
    r = config.routing
    assert r.health_check_interval is not None
    return HealthChecker(
        deployments,
        r.health_check_interval,
        path=r.health_check_path,
        timeout=r.health_check_timeout,
        unhealthy_after=r.unhealthy_after,
        on_change=(lambda d, ok: metrics.deployment_health(d.label, ok)) if metrics else None,
    )


async def _open_budgets(config: GatewayConfig, db: Database) -> BudgetBook:
    limits = config.limits
    shared = SharedTotals.from_url(limits.redis_url) if limits.redis_url else None
    budgets = BudgetBook(db.reader, shared=shared, fail_closed=limits.on_redis_failure == "closed")
    await budgets.start()
    return budgets


async def _follow_prices(prices: PriceBook, db: Database) -> asyncio.Task[None]:
    """Load the prices set in the database, then follow the table off the request path."""
    table = DatabasePrices(prices, db.reader)
    await table.refresh()
    return asyncio.create_task(table.follow(_PRICES_EVERY))


def _ledger(config: GatewayConfig, db: Database) -> Ledger:
    acc = config.accounting
    spool = Path(acc.spool_path) if acc.spool_path else config.base_dir / "lmgate-ledger.spool"
    if not spool.is_absolute():
        spool = config.base_dir / spool
    return Ledger(
        db, spool_path=spool, flush_interval=acc.flush_interval, batch_size=acc.batch_size
    )


def _admin_app(config: GatewayConfig, db: Database) -> object:
    from lmgate.admin.api import build_admin_app  # FastAPI loads only where it is used

    key = config.auth.admin_key.get_secret_value() if config.auth.admin_key else None
    return build_admin_app(db, key or os.environ.get("LMGATE_ADMIN_KEY"))


async def _purge_loop(db: Database, retention: timedelta) -> None:
    """Delete logged bodies older than the retention period, hourly."""
    while True:
        with contextlib.suppress(Exception):
            await purge_bodies(db.engine, retention)
        await asyncio.sleep(_PURGE_EVERY)
