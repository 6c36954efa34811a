"""The in-process backend: a least-recently-used map bounded by bytes, with expiry."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class MemoryStore:
    """An LRU of bytes: every operation is O(1) (eviction: O(1) per evicted entry).

    An entry's size counts its key and value. Expired entries are dropped when read, or
    evicted in LRU order like any other when room is needed.
    """

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        """Bytes held (keys and values)."""
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        """The value under `key` unless expired; a hit becomes the most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        """Store `value` for `ttl` seconds, evicting the least recently used entries for room.

        A value larger than the whole store is not kept (and replaces nothing).
        """
        cost = len(key) + len(value)
        if ttl <= 0 or cost > self.max_bytes:
            return
        self._remove(key)
        self._entries[key] = (self._clock() + ttl, value)
        self.size += cost
        while self.size > self.max_bytes:
            old, (_, old_value) = self._entries.popitem(last=False)
            self.size -= len(old) + len(old_value)

    async def close(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self.size = 0

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.size -= len(key) + len(entry[1])
