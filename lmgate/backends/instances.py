"""A worker at run time: its job, its endpoint, its health, its telemetry and its deployment."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from lmgate.backends.launchers.base import JobState
from lmgate.routing.deployment import Deployment

InstanceState = Literal["submitted", "starting", "ready", "draining", "ended"]
"""submitted: the job is queued; starting: it runs but is not ready yet; ready: in rotation;
draining: out of rotation, waiting for its requests to finish; ended: gone."""

ACTIVE = frozenset({"submitted", "starting", "ready"})


@dataclass(frozen=True)
class TelemetryRecord:
    """Load figures a worker reported."""

    at: float
    running: int = 0
    waiting: int = 0
    kv_cache: float | None = None
    """KV-cache use, 0 to 1."""
    tokens_per_s: float | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any], at: float) -> TelemetryRecord:
        """Parse a telemetry POST body; raises ValueError on a malformed one."""

        def number(key: str, kind: type) -> Any:
            value = payload.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{key} must be a non-negative number")
            return kind(value)

        return cls(
            at=at,
            running=number("running", int) or 0,
            waiting=number("waiting", int) or 0,
            kv_cache=number("kv_cache", float),
            tokens_per_s=number("tokens_per_s", float),
        )


@dataclass(eq=False)
class Instance:
    """One worker of a managed model."""

    id: str
    model: str
    launcher: str
    secret_hash: str
    port: int
    submitted_at: float
    """Unix time."""
    state: InstanceState = "submitted"
    job_id: str | None = None
    host: str | None = None
    started_at: float | None = None
    ready_at: float | None = None
    reason: str | None = None
    job: JobState | None = None
    job_seen_at: float = 0.0
    """Monotonic time of the last poll that returned `job`."""
    deployment: Deployment | None = None
    health_fails: int = 0
    probing: bool = False
    """A readiness probe is under way."""
    next_health: float = 0.0
    replaced: bool = False
    """A replacement was started because the walltime is about to end."""
    drain_since: float | None = None
    idle_ticks: int = 0
    telemetry: deque[TelemetryRecord] = field(default_factory=lambda: deque(maxlen=60))

    @property
    def endpoint(self) -> str | None:
        """`host:port`, once known."""
        return f"{self.host}:{self.port}" if self.host else None

    @property
    def base_url(self) -> str:
        """The worker's OpenAI base URL."""
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def inflight(self) -> int:
        """Requests this gateway has in flight on the worker."""
        return self.deployment.inflight if self.deployment is not None else 0

    def time_left(self) -> float | None:
        """Seconds until the job's walltime ends, as of now."""
        if self.job is None or self.job.time_left is None:
            return None
        return self.job.time_left - (time.monotonic() - self.job_seen_at)

    def external_load(self) -> int:
        """Requests the worker reports beyond this gateway's own (other replicas, queues)."""
        if not self.telemetry:
            return 0
        last = self.telemetry[-1]
        return max(0, last.running + last.waiting - self.inflight)

    def quiet(self) -> bool:
        """No request in flight here, and none reported by the worker's latest telemetry."""
        return self.inflight == 0 and self.external_load() == 0
