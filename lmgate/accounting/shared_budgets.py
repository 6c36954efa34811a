"""Budgets' running totals in Redis, so that every replica reserves against the same money.

Each budget period is a hash `{spent, reserved}` keyed by budget and period start, seeded
from the ledger's sum the first time a replica sees it (HSETNX: the first seed wins), and
kept a day past the period's end. Reservation and settlement are Lua scripts: one round
trip each, atomic across replicas.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lmgate.limits.resp import RespClient, Script

if TYPE_CHECKING:
    from lmgate.accounting.budgets import BudgetState

PREFIX = "lmgate:budget:"
_KEEP_AFTER_RESET = 86400

# KEYS: one per budget. ARGV: amount, then per budget: limit, ttl.
# Returns 0 when reserved, else the 1-based index of the budget that cannot cover it,
# followed by that budget's spent and reserved.
_RESERVE = """
local amount = tonumber(ARGV[1])
for i = 1, #KEYS do
  local spent = tonumber(redis.call('HGET', KEYS[i], 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
  local limit = tonumber(ARGV[1 + (i - 1) * 2 + 1])
  if spent >= limit or spent + reserved + amount > limit then
    return {i, tostring(spent), tostring(reserved)}
  end
end
for i = 1, #KEYS do
  redis.call('HINCRBYFLOAT', KEYS[i], 'reserved', amount)
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1 + (i - 1) * 2 + 2]))
end
return {0}
"""

_SETTLE = """
local amount, cost = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
  redis.call('HSET', KEYS[i], 'reserved', tostring(math.max(0, reserved - amount)))
  redis.call('HINCRBYFLOAT', KEYS[i], 'spent', cost)
end
return 0
"""


class SharedTotals:
    """The Redis side of `BudgetBook`."""

    def __init__(self, client: RespClient) -> None:
        self.client = client
        self._reserve = Script(_RESERVE)
        self._settle = Script(_SETTLE)

    @classmethod
    def from_url(cls, url: str) -> SharedTotals:
        return cls(RespClient(url))

    @staticmethod
    def key(st: BudgetState) -> str:
        until = int(st.resets_at or 0)  # the same for the whole period
        return f"{PREFIX}{st.scope}:{st.scope_id}:{st.period}:{until}"

    async def seed(self, st: BudgetState) -> None:
        """Start the period's totals from the ledger, unless another replica already did."""
        key = self.key(st)
        await self.client.execute("HSETNX", key, "spent", repr(st.spent))
        await self.client.execute("EXPIRE", key, _ttl(st))

    async def reserve(
        self, states: tuple[BudgetState, ...], amount: float
    ) -> tuple[int, float, float]:
        """(0, 0, 0) when reserved, else (index of the short budget, its spent, reserved)."""
        args: list[float | int] = [amount]
        for st in states:
            args += [st.amount, _ttl(st)]
        result = await self.client.evalsha(self._reserve, [self.key(st) for st in states], args)
        if int(result[0]) == 0:
            return 0, 0.0, 0.0
        return int(result[0]), float(result[1]), float(result[2])

    async def settle(self, states: tuple[BudgetState, ...], amount: float, cost: float) -> None:
        await self.client.evalsha(self._settle, [self.key(st) for st in states], [amount, cost])

    async def close(self) -> None:
        await self.client.close()


def _ttl(st: BudgetState) -> int:
    if st.resets_at is None:
        return 10 * 365 * 86400
    return max(60, int(st.resets_at - time.time()) + _KEEP_AFTER_RESET)
