"""Scaling arithmetic, kept free of I/O: the load average, the wanted worker count, Retry-After."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ModelState = Literal["ready", "starting", "cold", "failed"]
MAX_RETRY_AFTER = 60


@dataclass(frozen=True)
class ColdModel:
    """The answer for a request that found no ready worker.

    The gateway turns it into a 503 `model_not_ready` with `Retry-After: retry_after`
    (state `starting` or `cold`), or a 503 `model_failed` (state `failed`), or waits up to
    the model's `cold_wait` with `BackendManager.wait_ready`.
    """

    model: str
    state: ModelState
    retry_after: int
    message: str
    reason: str | None = None


class LoadAverage:
    """An exponential moving average over `window` seconds of irregular samples."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.value = 0.0
        self._last: float | None = None

    def add(self, sample: float, now: float) -> float:
        """Fold in `sample` taken at monotonic time `now`; returns the new average."""
        if self._last is None:
            self.value = sample
        else:
            alpha = 1.0 - math.exp(-max(0.0, now - self._last) / self.window)
            self.value += alpha * (sample - self.value)
        self._last = now
        return self.value


def wanted_instances(
    average_inflight: float,
    target: float,
    *,
    in_demand: bool,
    min_instances: int,
    max_instances: int,
) -> int:
    """How many workers the load asks for: enough to keep each at or under `target`.

    A model nobody asked for during the idle timeout wants `min_instances` (0: scale to zero);
    one in demand wants at least one.
    """
    if not in_demand:
        return min_instances
    wanted = max(1, math.ceil(average_inflight / target - 1e-9))
    return max(min_instances, min(max_instances, wanted))


def retry_after(expected_start: float, elapsed: float) -> int:
    """Seconds a client should wait: what remains of the expected start time, 1 to 60."""
    remaining = expected_start - elapsed
    return max(1, min(MAX_RETRY_AFTER, math.ceil(remaining)))


def starting_message(model: str, seconds: int) -> str:
    """The 503 message of a model that is starting."""
    return (
        f"The model {model!r} is starting (it had no running instance); retry in about {seconds} s."
    )


def failed_message(model: str, reason: str) -> str:
    """The 503 message of a model whose launches keep failing."""
    return f"The model {model!r} failed to start: {reason}"
