"""A deployment: one provider serving one model, with its load and health state."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from lmgate.upstream.provider import Provider


@dataclass(eq=False)
class Deployment:
    """Where a request can go, and what the balancer knows about it."""

    provider: Provider
    upstream_model: str | None
    """The upstream's name for the model; None passes the client's name unchanged."""
    weight: float = 1.0
    max_inflight: int | None = None
    inflight: int = 0
    fails: int = 0
    cooldown_until: float = 0.0
    healthy: bool = True
    """Set by the active health checker; unhealthy deployments are tried last."""
    label: str = field(default="")

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"{self.provider.name}/{self.upstream_model or '*'}"

    def cooling(self, now: float) -> bool:
        """Whether the deployment is resting after repeated failures."""
        return self.cooldown_until > now

    def succeeded(self) -> None:
        """Record a success: the failure streak ends."""
        self.fails = 0

    def failed(self, allowed_fails: int, cooldown: float) -> None:
        """Record a failure; after `allowed_fails` in a row the deployment cools down."""
        self.fails += 1
        if self.fails >= allowed_fails:
            self.fails = 0
            self.cooldown_until = time.monotonic() + cooldown


class Slots(Protocol):
    """In-flight slots of deployments with `max_inflight`, shared with other replicas."""

    async def take_slot(self, dep: Deployment, request_id: str) -> bool:
        """Take one of `dep`'s slots; False when every one is taken."""

    def free_slot(self, dep: Deployment, request_id: str) -> None:
        """Give a slot back."""


def attempt_order(deployments: list[Deployment], attempts: int) -> list[Deployment]:
    """Deployments to try, best first: healthy before cooling, then least in flight per weight.

    Ties are broken at random so that equal deployments share the load. Deployments at their
    `max_inflight` are left out: an empty list means every one is busy.
    """
    if len(deployments) == 1:
        d = deployments[0]
        return [] if d.max_inflight is not None and d.inflight >= d.max_inflight else deployments
    now = time.monotonic()
    ranked = sorted(
        (d for d in deployments if d.max_inflight is None or d.inflight < d.max_inflight),
        key=lambda d: (
            not d.healthy,
            d.cooling(now),
            (d.inflight + 1) / d.weight,
            random.random(),
        ),
    )
    return ranked[:attempts]
