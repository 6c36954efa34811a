"""Active health checks: a deployment whose provider fails its probes leaves rotation.

Every `interval` seconds each provider is probed once (`GET <base_url><path>`, 2xx is a
pass), whatever the number of its deployments, all providers at the same time. After
`unhealthy_after` failures in a row the provider's deployments get `healthy = False` and
`attempt_order` tries them last; after `healthy_after` passes in a row they are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lmgate.routing.deployment import Deployment
from lmgate.upstream.client import UpstreamError
from lmgate.upstream.provider import Provider

log = logging.getLogger("lmgate.health")

_PROBE_FAILURES = (UpstreamError, OSError, TimeoutError)

OnChange = Callable[[Deployment, bool], None]


class _Target:
    """One provider's probe, its streaks, and the deployments that share its result."""

    __slots__ = ("deployments", "fails", "healthy", "passes", "provider")

    def __init__(self, provider: Provider) -> None:
        self.provider = provider
        self.deployments: list[Deployment] = []
        self.healthy = True
        self.fails = 0
        self.passes = 0


class HealthChecker:
    """Probes the providers of `deployments` in the background and sets their `healthy`."""

    def __init__(
        self,
        deployments: list[Deployment],
        interval: float,
        path: str = "/models",
        timeout: float = 5.0,
        unhealthy_after: int = 2,
        healthy_after: int = 1,
        on_change: OnChange | None = None,
    ) -> None:
        """`on_change(deployment, healthy)` is called for every deployment at `start()`, with
        its state then, and at every change."""
        self.interval = interval
        self.path = path
        self.timeout = timeout
        self.unhealthy_after = unhealthy_after
        self.healthy_after = healthy_after
        self.on_change = on_change
        targets: dict[Provider, _Target] = {}
        for dep in deployments:
            target = targets.get(dep.provider)
            if target is None:
                target = targets[dep.provider] = _Target(dep.provider)
            if not any(d is dep for d in target.deployments):
                target.deployments.append(dep)
        self.targets = list(targets.values())
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Report the initial state and start probing (the first round at once)."""
        for target in self.targets:
            for dep in target.deployments:
                dep.healthy = target.healthy
                if self.on_change is not None:
                    self.on_change(dep, target.healthy)
        self._task = asyncio.create_task(self._run(), name="lmgate-health")

    async def close(self) -> None:
        """Stop probing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check(self) -> None:
        """One round: probe every provider at once and apply the results."""
        failures = await asyncio.gather(*(self._probe(t.provider) for t in self.targets))
        for target, failure in zip(self.targets, failures, strict=True):
            self._apply(target, failure)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.check()
            except Exception:  # never let the checker die: the next round tries again
                log.exception("health check round failed")
            await asyncio.sleep(max(0.0, started + self.interval - loop.time()))

    async def _probe(self, provider: Provider) -> str | None:
        """None if the provider passes, else why it fails."""
        try:
            resp = await provider.request("GET", self.path, total_timeout=self.timeout)
            try:
                await resp.read()
            finally:
                resp.release()
        except _PROBE_FAILURES as e:
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"

    def _apply(self, target: _Target, failure: str | None) -> None:
        if failure is None:
            target.fails = 0
            target.passes += 1
            if not target.healthy and target.passes >= self.healthy_after:
                log.warning("provider %s passes its health check again", target.provider.name)
                self._set(target, True)
        else:
            target.passes = 0
            target.fails += 1
            if target.healthy and target.fails >= self.unhealthy_after:
                log.warning(
                    "provider %s failed %d health checks (%s): its deployments leave rotation",
                    target.provider.name,
                    target.fails,
                    target.provider.scrub(failure),
                )
                self._set(target, False)

    def _set(self, target: _Target, healthy: bool) -> None:
        target.healthy = healthy
        for dep in target.deployments:
            dep.healthy = healthy
            if self.on_change is not None:
                self.on_change(dep, healthy)
