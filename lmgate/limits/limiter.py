"""Admission control: requests and tokens per minute and requests in flight.

Every limit that applies to a request (its key's, user's, team's, model's) is checked and
counted in one step, all or nothing: in process with `LocalState`, or in Redis with one Lua
script (one round trip) when several replicas must share the limits. Tokens are counted
from an estimate at admission and corrected with the real count when the answer is done.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from lmgate.api.errors import GatewayError
from lmgate.api.http import Headers
from lmgate.auth.keys import Principal
from lmgate.limits.config import LimitSpec, LimitsSettings
from lmgate.limits.redis_backend import RedisUnavailable, RedisWindows
from lmgate.limits.windows import LocalState
from lmgate.routing.deployment import Deployment

log = logging.getLogger("lmgate.limits")

REQUESTS, TOKENS, PARALLEL = "r", "t", "c"
_NAMES = {REQUESTS: "requests per minute (RPM)", TOKENS: "tokens per minute (TPM)"}


@dataclass(slots=True)
class Check:
    """One limit to check and count: `cost` against `limit` in window (or set) `name`."""

    name: str
    kind: str
    limit: int
    cost: int
    label: str


@dataclass(slots=True)
class Outcome:
    """What a backend decided: refused at `failed` (an index), or the usage after counting."""

    failed: int | None
    used: list[int]
    resets: list[int]


@dataclass(slots=True)
class Admission:
    """An admitted request's counted limits, to correct and release when it ends."""

    limiter: Limiter | None
    checks: list[Check] = field(default_factory=list)
    request_id: str = ""
    headers: Headers = field(default_factory=list)
    shared: bool = False

    def finish(self, tokens: int) -> None:
        """Replace the token estimate by `tokens` and free the in-flight slots."""
        if self.limiter is not None and self.checks:
            self.limiter.settle(self, tokens)


NO_LIMITS = Admission(None)


class Limiter:
    """Checks and counts every rate limit of a request, locally or in Redis."""

    def __init__(self, settings: LimitsSettings, redis: RedisWindows | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.local = LocalState()
        self._warned_at = 0.0

    def checks(self, principal: Principal | None, model: str, tokens: int) -> list[Check]:
        """The limits that apply to a request for `model` by `principal`."""
        s = self.settings
        specs: list[tuple[str, str, LimitSpec | None]] = [("model", model, _pick(s.model, model))]
        if principal is not None:
            own = LimitSpec.from_json(principal.limits) or s.key
            specs.append(("key", str(principal.key_id), own))
            specs.append(("user", str(principal.user_id), _pick(s.user, principal.user_name)))
            if principal.team_id is not None:
                team = _pick(s.team, principal.team_name or "")
                specs.append(("team", str(principal.team_id), team))
        out = []
        for scope, ident, spec in specs:
            if spec is None:
                continue
            label = f"{scope} {ident}"
            base = f"{scope}:{ident}"
            if spec.rpm:
                out.append(Check(f"{base}:r", REQUESTS, spec.rpm, 1, label))
            if spec.tpm:
                out.append(Check(f"{base}:t", TOKENS, spec.tpm, tokens, label))
            if spec.max_parallel:
                out.append(Check(f"{base}:c", PARALLEL, spec.max_parallel, 1, label))
        return out

    async def admit(
        self, principal: Principal | None, model: str, tokens: int, request_id: str
    ) -> Admission:
        """Count the request against its limits; 429 `rate_limit_exceeded` when one is reached."""
        checks = self.checks(principal, model, tokens)
        if not checks:
            return NO_LIMITS
        now = time.time()
        shared = False
        outcome = None
        if self.redis is not None and self.redis.available(now):
            try:
                outcome = await self.redis.admit(checks, int(now), request_id)
                shared = True
            except RedisUnavailable as e:
                self._degraded(e, now)
        if outcome is None:
            outcome = self._admit_local(checks, int(now))
        if outcome.failed is not None:
            raise _refused(checks, outcome)
        return Admission(self, checks, request_id, _headers(checks, outcome), shared)

    async def take_slot(self, dep: Deployment, request_id: str) -> bool:
        """One of `dep`'s `max_inflight` slots, counted in Redis across every replica.

        False when every slot is taken. Without Redis (or while it is down and the policy is
        to fail open) only this process's count applies, which the balancer already keeps.
        """
        assert dep.max_inflight is not None
        now = time.time()
        if self.redis is None or not self.redis.available(now):
            return True
        try:
            outcome = await self.redis.admit([_slot(dep)], int(now), request_id)
        except RedisUnavailable as e:
            self._degraded(e, now)
            return True
        return outcome.failed is None

    def free_slot(self, dep: Deployment, request_id: str) -> None:
        """Give back a slot taken with `take_slot` (in the background)."""
        if self.redis is not None:
            task = asyncio.ensure_future(
                self.redis.settle([_slot(dep)], request_id, 0, int(time.time()))
            )
            task.add_done_callback(_ignore_result)

    def _degraded(self, error: RedisUnavailable, now: float) -> None:
        if self.settings.on_redis_failure == "closed":
            raise GatewayError(
                503,
                "Rate limits cannot be checked right now; try again shortly.",
                code="limits_unavailable",
                headers={"Retry-After": "1"},
            )
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning("Redis unavailable (%s): limits are per process until it returns", error)

    def _admit_local(self, checks: list[Check], now: int) -> Outcome:
        state = self.local
        used: list[int] = []
        resets: list[int] = []
        for i, c in enumerate(checks):
            if c.kind == PARALLEL:
                total, reset = state.running.get(c.name, 0), 1
            else:
                w = state.window(c.name)
                total, reset = w.used(now), w.reset_in(now)
            if total >= c.limit or (c.cost > 0 and total + c.cost > c.limit):
                return Outcome(i, [total], [max(reset, 1)])
            used.append(total + c.cost)
            resets.append(reset or 60)
        for c in checks:
            if c.kind == PARALLEL:
                state.running[c.name] = state.running.get(c.name, 0) + 1
            else:
                state.window(c.name).add(now, c.cost)
        return Outcome(None, used, resets)

    def settle(self, admission: Admission, tokens: int) -> None:
        """Correct the token estimate and release in-flight slots (in Redis in the background)."""
        if admission.shared and self.redis is not None:
            task = asyncio.ensure_future(
                self.redis.settle(admission.checks, admission.request_id, tokens, int(time.time()))
            )
            task.add_done_callback(_ignore_result)
            return
        now = int(time.time())
        for c in admission.checks:
            if c.kind == PARALLEL:
                self.local.running[c.name] = max(0, self.local.running.get(c.name, 0) - 1)
            elif c.kind == TOKENS and tokens != c.cost:
                self.local.window(c.name).add(now, tokens - c.cost)


def _slot(dep: Deployment) -> Check:
    assert dep.max_inflight is not None
    return Check(f"deployment:{dep.label}:c", PARALLEL, dep.max_inflight, 1, dep.label)


def _pick(table: dict[str, LimitSpec], name: str) -> LimitSpec | None:
    return table.get(name) or table.get("*")


def _headers(checks: list[Check], outcome: Outcome) -> Headers:
    """OpenAI's `x-ratelimit-*` headers for the tightest request and token limits."""
    headers: Headers = []
    for kind, noun in ((REQUESTS, b"requests"), (TOKENS, b"tokens")):
        best = None
        for i, c in enumerate(checks):
            if c.kind == kind:
                remaining = max(0, c.limit - outcome.used[i])
                if best is None or remaining < best[1]:
                    best = (c.limit, remaining, outcome.resets[i])
        if best is not None:
            headers += [
                (b"x-ratelimit-limit-" + noun, str(best[0]).encode()),
                (b"x-ratelimit-remaining-" + noun, str(best[1]).encode()),
                (b"x-ratelimit-reset-" + noun, _duration(best[2]).encode()),
            ]
    return headers


def _refused(checks: list[Check], outcome: Outcome) -> GatewayError:
    assert outcome.failed is not None
    c = checks[outcome.failed]
    used, wait = outcome.used[0], max(1, outcome.resets[0])
    if c.kind == PARALLEL:
        message = (
            f"Too many requests in flight for {c.label}: the limit is {c.limit} at once. "
            "Please try again when one has finished."
        )
        wait = 1
    else:
        message = (
            f"Rate limit reached for {c.label} on {_NAMES[c.kind]}: Limit {c.limit}, "
            f"Used {used}, Requested {c.cost}. Please try again in {_duration(wait)}."
        )
    headers = {"Retry-After": str(wait)}
    if c.kind != PARALLEL:
        noun = "requests" if c.kind == REQUESTS else "tokens"
        headers |= {
            f"x-ratelimit-limit-{noun}": str(c.limit),
            f"x-ratelimit-remaining-{noun}": str(max(0, c.limit - used)),
            f"x-ratelimit-reset-{noun}": _duration(wait),
        }
    return GatewayError(
        429,
        message,
        code="rate_limit_exceeded",
        type={"r": "requests", "t": "tokens", "c": "requests"}[c.kind],
        headers=headers,
    )


def _duration(seconds: int) -> str:
    """OpenAI's reset format: `1s`, `6m0s`."""
    seconds = max(0, math.ceil(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60}s"


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not settle limits in Redis: %s", type(task.exception()).__name__)
