"""The shared backend: Redis, so that every replica answers from the same cache.

Redis being slow or down never fails a request: the operation counts as a miss (or a skipped
store), Redis is left alone for `retry_after` seconds, and a warning is logged at most once per
`log_interval`.
"""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("lmgate.cache")

_FAILURES = (RedisError, OSError)
"""Connection refused or reset, timeouts (TimeoutError is an OSError), server errors."""


class RedisStore:
    """Values under `prefix + key`, written with `SET key value EX ttl`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "lmgate:cache:",
        timeout: float = 0.25,
        retry_after: float = 1.0,
        log_interval: float = 60.0,
    ) -> None:
        self.prefix = prefix
        self.retry_after = retry_after
        self.log_interval = log_interval
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # the default retries ten times, backing off for seconds
        )
        self._down_until = 0.0
        self._logged_at: float | None = None

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent, expired or Redis is unavailable."""
        if self._resting():
            return None
        try:
            value = await self._redis.get(self.prefix + key)
        except _FAILURES as e:
            self._failed(e)
            return None
        return value if isinstance(value, bytes) else None  # str only with decode_responses

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        """Store `value` for `ttl` seconds; nothing happens when Redis is unavailable."""
        if ttl <= 0 or self._resting():
            return
        try:
            await self._redis.set(self.prefix + key, value, ex=ttl)
        except _FAILURES as e:
            self._failed(e)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()

    def _resting(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._down_until = now + self.retry_after
        if self._logged_at is None or now - self._logged_at >= self.log_interval:
            self._logged_at = now
            log.warning(
                "response cache: Redis unavailable (%s: %s); answering without the cache",
                type(error).__name__,
                error,
            )
