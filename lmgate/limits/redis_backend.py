"""Rate-limit windows in Redis, shared by every replica: one Lua script, one round trip.

Each window is a hash `second -> count` that expires two minutes after its last write; each
in-flight limit is a sorted set of request ids scored by an expiry, so that a replica that
dies mid-request cannot hold a slot for more than ten minutes.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from lmgate.limits.resp import RespClient, RespError, Script

if TYPE_CHECKING:
    from lmgate.limits.limiter import Check, Outcome

PREFIX = "lmgate:rl:"
_RETRY_AFTER_FAILURE = 1.0
_SLOT_TTL = 600

# KEYS: one per check. ARGV: now, n, then per check: kind, limit, cost, member.
# Returns {0, failed index, used, reset} or {1, used..., reset...}.
_ADMIT = """
local now = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local used, resets = {}, {}
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local kind, limit, cost = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local key = KEYS[i]
  local total, oldest = 0, now
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    total = redis.call('ZCARD', key)
  else
    local h = redis.call('HGETALL', key)
    for j = 1, #h, 2 do
      local s = tonumber(h[j])
      if s <= now - 60 then
        redis.call('HDEL', key, h[j])
      else
        total = total + tonumber(h[j + 1])
        if s < oldest then oldest = s end
      end
    end
  end
  local reset = oldest + 60 - now
  if kind == 'c' then reset = 1 end
  if total >= limit or (cost > 0 and total + cost > limit) then
    return {0, i, total, reset}
  end
  used[i] = total + cost
  resets[i] = reset
end
local out = {1}
for i = 1, n do
  local base = 2 + (i - 1) * 4
  local kind, cost, member = ARGV[base + 1], tonumber(ARGV[base + 3]), ARGV[base + 4]
  if kind == 'c' then
    redis.call('ZADD', KEYS[i], now + %d, member)
    redis.call('EXPIRE', KEYS[i], %d)
  else
    redis.call('HINCRBY', KEYS[i], now, cost)
    redis.call('EXPIRE', KEYS[i], 120)
  end
  out[#out + 1] = used[i]
end
for i = 1, n do out[#out + 1] = resets[i] end
return out
""" % (_SLOT_TTL, _SLOT_TTL)  # noqa: UP031 (Lua braces make f-strings unreadable)


class RedisUnavailable(Exception):
    """Redis did not answer; the caller applies the configured failure policy."""


class RedisWindows:
    """The shared windows, with a short back-off after a failure so requests stay fast."""

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self._script = Script(_ADMIT)
        self._down_until = 0.0

    @classmethod
    def from_url(cls, url: str) -> RedisWindows:
        return cls(RespClient(url))

    def available(self, now: float) -> bool:
        """False for a moment after a failure: meanwhile limits are per process."""
        return now >= self._down_until

    async def admit(self, checks: list[Check], now: int, request_id: str) -> Outcome:
        from lmgate.limits.limiter import Outcome

        keys = [PREFIX + c.name for c in checks]
        args: list[Any] = [now, len(checks)]
        for c in checks:
            args += [c.kind, c.limit, c.cost, request_id]
        try:
            result = await self.client.evalsha(self._script, keys, args)
        except (RespError, OSError) as e:
            self._failed()
            raise RedisUnavailable(type(e).__name__) from None
        values = [int(v) for v in result]
        if values[0] == 0:
            return Outcome(values[1] - 1, [values[2]], [values[3]])
        n = len(checks)
        return Outcome(None, values[1 : 1 + n], values[1 + n : 1 + 2 * n])

    async def settle(self, checks: list[Check], request_id: str, tokens: int, now: int) -> None:
        """Correct token estimates and free in-flight slots (pipelined on one connection)."""
        commands = []
        for c in checks:
            if c.kind == "c":
                commands.append(self.client.execute("ZREM", PREFIX + c.name, request_id))
            elif c.kind == "t" and tokens != c.cost:
                commands.append(
                    self.client.execute("HINCRBY", PREFIX + c.name, now, tokens - c.cost)
                )
        try:
            await asyncio.gather(*commands)
        except (RespError, OSError):
            self._failed()

    def _failed(self) -> None:
        self._down_until = time.time() + _RETRY_AFTER_FAILURE

    async def close(self) -> None:
        await self.client.close()
