"""In-process rate-limit state: sliding one-minute windows of one-second buckets.

A window counts what happened in the last 60 seconds, to the second: requests admitted (or
tokens used) leave it 60 s after the second they were counted in, so a burst is limited
exactly and the allowance comes back smoothly. Redis holds the same structure (a hash of
second -> count) when several processes must share the limits.
"""

from __future__ import annotations

from collections import deque

WINDOW = 60


class Window:
    """What was counted in each of the last 60 seconds, and their total."""

    __slots__ = ("_buckets", "total")

    def __init__(self) -> None:
        self._buckets: deque[list[int]] = deque()
        self.total = 0

    def used(self, now: int) -> int:
        """The total over the window ending at second `now`."""
        buckets = self._buckets
        while buckets and buckets[0][0] <= now - WINDOW:
            self.total -= buckets.popleft()[1]
        return self.total

    def add(self, now: int, amount: int) -> None:
        """Count `amount` (possibly negative: a correction) in second `now`."""
        buckets = self._buckets
        if buckets and buckets[-1][0] == now:
            buckets[-1][1] += amount
        else:
            buckets.append([now, amount])
        self.total += amount

    def reset_in(self, now: int) -> int:
        """Seconds until the oldest counted second leaves the window."""
        self.used(now)
        return self._buckets[0][0] + WINDOW - now if self._buckets else 0


class LocalState:
    """Every window and concurrency counter of one process, by limit name."""

    def __init__(self) -> None:
        self.windows: dict[str, Window] = {}
        self.running: dict[str, int] = {}

    def window(self, name: str) -> Window:
        w = self.windows.get(name)
        if w is None:
            w = self.windows[name] = Window()
        return w
