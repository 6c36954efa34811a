"""What a cache backend provides."""

from __future__ import annotations

from typing import Protocol


class CacheStore(Protocol):
    """Bytes by key, each with a time to live. Never raises for an unavailable backend."""

    async def get(self, key: str) -> bytes | None:
        """The value stored under `key`, or None (absent, expired or backend unavailable)."""
        ...

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        """Store `value` under `key` for `ttl` seconds (best effort)."""
        ...

    async def close(self) -> None:
        """Release connections or memory."""
        ...
