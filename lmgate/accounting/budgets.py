"""Budgets on the hot path: reserve a request's maximum cost before forwarding, settle after.

Every budget that applies to a key (its own, its user's, its team's) is held in memory with
its spend in the current period. A reservation is a check-and-add, so requests running
concurrently can never together exceed a budget by more than one request's reservation:
in this process, or — with `limits.redis_url` — across every replica, whose running totals
are then kept in Redis (`shared_budgets`). Budgets and their spend are (re)loaded from the
database at start and whenever a budget changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from lmgate.accounting.shared_budgets import SharedTotals
from lmgate.api.errors import GatewayError
from lmgate.auth.keys import Principal
from lmgate.limits.resp import RespError
from lmgate.storage.budgets import next_reset, period_start, spent
from lmgate.storage.models import ApiKey, Budget, Team, User

log = logging.getLogger("lmgate.budgets")
_OVERLAP = timedelta(seconds=5)


@dataclass(slots=True, eq=False)
class BudgetState:
    """One budget and what has been spent and reserved against it this period."""

    scope: str
    scope_id: int
    label: str
    amount: float
    period: str
    resets_at: float | None
    spent: float = 0.0
    reserved: float = 0.0

    def roll(self, now: float) -> None:
        """Start a new period when the current one is over."""
        if self.resets_at is not None and now >= self.resets_at:
            self.spent = 0.0
            self.resets_at = _reset_after(self.period, now)


@dataclass(slots=True)
class Reservation:
    """Money held against some budgets until the request's real cost is known."""

    states: tuple[BudgetState, ...]
    amount: float
    shared: bool = False


class BudgetBook:
    """Every budget, in memory, following the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        refresh_interval: float = 2.0,
        shared: SharedTotals | None = None,
        fail_closed: bool = False,
    ) -> None:
        self.engine = engine
        self.shared = shared
        self.fail_closed = fail_closed
        self._warned_at = 0.0
        self.refresh_interval = refresh_interval
        self._states: dict[tuple[str, int], BudgetState] = {}
        self._watermark: datetime | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load budgets and their spend, then follow changes."""
        await self.refresh()
        self._task = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.shared is not None:
            await self.shared.close()

    async def reserve(self, principal: Principal, amount: float) -> Reservation | None:
        """Hold `amount` against the key's budgets; 429 `insufficient_quota` if one is out.

        With Redis the totals are every replica's; without, this process's.
        """
        states = self._applicable(principal)
        if not states:
            return None
        now = time.time()
        for st in states:
            st.roll(now)
        if self.shared is not None:
            reservation = await self._reserve_shared(states, amount, now)
            if reservation is not None:
                return reservation
        for st in states:
            if st.spent >= st.amount or st.spent + st.reserved + amount > st.amount:
                raise _exhausted(st)
        for st in states:
            st.reserved += amount
        return Reservation(states, amount)

    async def _reserve_shared(
        self, states: tuple[BudgetState, ...], amount: float, now: float
    ) -> Reservation | None:
        """Reserve in Redis; None when Redis is down and the policy is to fail open."""
        assert self.shared is not None
        try:
            short, spent_, reserved = await self.shared.reserve(states, amount)
        except (RespError, OSError) as e:
            if self.fail_closed:
                raise GatewayError(
                    503,
                    "Budgets cannot be checked right now; try again shortly.",
                    code="budgets_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("Redis unavailable (%s): budgets are per process", type(e).__name__)
            return None
        if short:
            st = states[short - 1]
            st.spent, st.reserved = spent_, reserved
            raise _exhausted(st)
        return Reservation(states, amount, shared=True)

    def settle(self, reservation: Reservation | None, cost: float) -> None:
        """Replace the reservation by the request's actual cost."""
        if reservation is None:
            return
        if reservation.shared and self.shared is not None:
            task = asyncio.ensure_future(
                self.shared.settle(reservation.states, reservation.amount, cost)
            )
            task.add_done_callback(_log_failure)
        for st in reservation.states:
            if not reservation.shared:
                st.reserved = max(0.0, st.reserved - reservation.amount)
            st.spent += cost

    def _applicable(self, p: Principal) -> tuple[BudgetState, ...]:
        found = []
        for key in (("key", p.key_id), ("user", p.user_id), ("team", p.team_id)):
            st = self._states.get(key) if key[1] is not None else None  # type: ignore[arg-type]
            if st is not None:
                found.append(st)
        return tuple(found)

    async def refresh(self) -> None:
        """Load budgets changed since the last poll, with their spend this period."""
        started = datetime.now(UTC)
        query = select(Budget.scope, Budget.scope_id, Budget.amount, Budget.period)
        if self._watermark is not None:
            query = query.where(Budget.updated_at > self._watermark)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
            existing = (await conn.execute(select(Budget.scope, Budget.scope_id))).all()
        for gone in set(self._states) - {(e.scope, e.scope_id) for e in existing}:
            del self._states[gone]
        for b in rows:
            await self._load(b.scope, b.scope_id, b.amount, b.period)
        self._watermark = started - _OVERLAP

    async def _load(self, scope: str, scope_id: int, amount: float, period: str) -> None:
        now = datetime.now(UTC)
        since = period_start(period, now)
        key = (scope, scope_id)
        old = self._states.get(key)
        state = BudgetState(
            scope=scope,
            scope_id=scope_id,
            label=await self._label(scope, scope_id),
            amount=amount,
            period=period,
            resets_at=_reset_after(period, now.timestamp()),
            spent=await spent(self.engine, scope, scope_id, since),
            reserved=old.reserved if old is not None else 0.0,
        )
        if old is not None and old.spent > state.spent and old.resets_at == state.resets_at:
            state.spent = old.spent  # records not yet in the ledger count too
        self._states[key] = state
        if self.shared is not None:
            try:
                await self.shared.seed(state)
            except (RespError, OSError) as e:
                log.warning("could not seed budget totals in Redis: %s", type(e).__name__)

    async def _label(self, scope: str, scope_id: int) -> str:
        table = {"key": ApiKey.prefix, "user": User.name, "team": Team.name}[scope]
        owner = {"key": ApiKey.id, "user": User.id, "team": Team.id}[scope]
        async with self.engine.connect() as conn:
            name = (await conn.execute(select(table).where(owner == scope_id))).scalar()
        return f"{scope} {name}" if name else scope

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await self.refresh()
            except Exception as e:  # the database may be down: keep the budgets we have
                log.warning("budget refresh failed: %s", type(e).__name__)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not settle a budget in Redis: %s", type(task.exception()).__name__)


def _reset_after(period: str, now: float) -> float | None:
    reset = next_reset(period, datetime.fromtimestamp(now, UTC))
    return None if reset is None else reset.timestamp()


def _exhausted(st: BudgetState) -> GatewayError:
    when = (
        " It resets at " + datetime.fromtimestamp(st.resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if st.resets_at is not None
        else " It does not reset"
    )
    per = "in total" if st.period == "total" else f"per {st.period}"
    return GatewayError(
        429,
        f"Budget exceeded: the {st.label} budget of ${st.amount:.6g} {per} cannot cover this "
        f"request (${st.spent:.6g} used, ${st.reserved:.6g} reserved by requests in flight)."
        f"{when}.",
        code="insufficient_quota",
        type="insufficient_quota",
        headers={"x-should-retry": "false"},
    )
