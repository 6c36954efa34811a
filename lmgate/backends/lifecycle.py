"""The per-worker half of a model's pool: following each job from submission to its end.

`PoolBase` holds a pool's state and moves each worker through its states (submitted,
starting, ready, draining, ended): readiness probes, health checks, walltime replacement,
draining and cancellation. `pool.ModelPool` adds the request path, launching and scaling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from lmgate.backends.config import BackendsSettings, LocalBackendConfig, SlurmBackendConfig
from lmgate.backends.health import Prober
from lmgate.backends.instances import Instance
from lmgate.backends.launchers.base import Launcher
from lmgate.backends.scaling import LoadAverage
from lmgate.backends.state import BackendStore
from lmgate.routing.deployment import Deployment

log = logging.getLogger("lmgate.backends")

MakeDeployment = Callable[[str, str], Deployment]
_QUIET_TICKS = 2


class PoolBase:
    """A model's workers and what happens to each of them."""

    def __init__(
        self,
        name: str,
        config: SlurmBackendConfig | LocalBackendConfig,
        launcher: Launcher,
        store: BackendStore,
        prober: Prober,
        settings: BackendsSettings,
        make_deployment: MakeDeployment,
        gateway_url: str,
        base_dir: Path,
    ) -> None:
        self.name = name
        self.config = config
        self.launcher = launcher
        self.store = store
        self.prober = prober
        self.settings = settings
        self.make_deployment = make_deployment
        self.gateway_url = gateway_url
        self.base_dir = base_dir
        self.instances: dict[str, Instance] = {}
        self.ready: list[Deployment] = []
        """The hot path's list: deployments of ready workers."""
        self.failed_reason: str | None = None
        self.launch_failures = 0
        self.history: list[float] = []
        self.last_request = -float("inf")
        self.stopped = False
        self.waiting = 0
        self._next_launch = 0.0
        self._launching = False
        self._below_since: float | None = None
        self._load = LoadAverage(config.scale_window)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: list[Deployment] = []

    async def _launch_failed(self, reason: str, permanent: bool) -> None:
        self.launch_failures += 1
        if permanent or self.launch_failures >= self.config.max_launch_failures:
            self.failed_reason = reason
            log.error("%s: failed after %d launches: %s", self.name, self.launch_failures, reason)
            await self.store.set_model(self.name, failed_reason=reason)
        else:
            delay = self.config.launch_backoff * 2 ** (self.launch_failures - 1)
            self._next_launch = time.monotonic() + delay
        self._notify()

    async def _follow(self, inst: Instance) -> None:
        job = inst.job
        if inst.state == "ended":
            if job is None or job.phase == "ended" or inst.job_id is None:
                self.instances.pop(inst.id, None)
            return
        if job is not None and job.phase == "ended":
            reason = job.state + (f": {job.reason}" if job.reason else "")
            if inst.state in ("submitted", "starting"):
                await self._launch_failed(f"job {inst.job_id} ended before ready ({reason})", False)
            await self._end(inst, reason, cancel=False)
            return
        if inst.state == "submitted" and job is not None and job.phase == "running":
            await self.mark_started(inst, job.started_at)
        if inst.state == "starting":
            await self._check_starting(inst)
        elif inst.state == "ready":
            self._check_ready(inst)
        elif inst.state == "draining":
            await self._check_draining(inst)

    async def mark_started(self, inst: Instance, at: float | None = None) -> None:
        """The job runs (the scheduler said so, or the worker registered)."""
        inst.state = "starting"
        inst.started_at = at or time.time()
        if self.config.discovery == "squeue" and inst.job and inst.job.node:
            inst.host = inst.job.node
        await self.store.save(inst)

    async def _check_starting(self, inst: Instance) -> None:
        assert inst.started_at is not None
        if time.time() - inst.started_at > self.config.startup_timeout:
            timeout = self.config.startup_timeout
            await self._launch_failed(
                f"job {inst.job_id} was not ready within {timeout:g} s", False
            )
            await self._end(inst, f"not ready within startup_timeout ({timeout:g} s)")
            return
        if inst.host is None and self.config.discovery == "register":
            row = await self.store.get(inst.id)  # registered on another replica?
            if row is not None and row.host and row.port:
                inst.host, inst.port = row.host, row.port
        if inst.host is not None:
            self.probe(inst)

    def probe(self, inst: Instance) -> None:
        """Check a starting worker's readiness in the background (once at a time)."""
        if not inst.probing:
            inst.probing = True
            self._spawn(self._probe_ready(inst))

    async def _probe_ready(self, inst: Instance) -> None:
        try:
            if inst.state == "starting" and await self.prober.ready(inst.base_url):
                await self._make_ready(inst)
        finally:
            inst.probing = False

    async def _make_ready(self, inst: Instance) -> None:
        if inst.state != "starting":
            return
        inst.state, inst.ready_at = "ready", time.time()
        inst.deployment = self.make_deployment(inst.base_url, self.upstream_model)
        self.launch_failures = 0
        self.rebuild()
        seconds = inst.ready_at - inst.submitted_at
        self.history.insert(0, seconds)
        log.info(
            "%s: instance %s ready on %s in %.2f s", self.name, inst.id, inst.endpoint, seconds
        )
        await self.store.save(inst)
        await self.store.record_start(self.name, seconds)

    def _check_ready(self, inst: Instance) -> None:
        dep = inst.deployment
        now = time.monotonic()
        if now >= inst.next_health or (dep is not None and dep.fails > 0):
            inst.next_health = now + self.config.health_interval
            self._spawn(self._health(inst))
        left = inst.time_left()
        if not inst.replaced and left is not None and left < self.config.walltime_margin:
            inst.replaced = True
            log.info(
                "%s: job %s ends in %.0f s; starting a replacement", self.name, inst.job_id, left
            )
            self.launch_soon(replacing=inst)
        if inst.replaced and any(
            i.state == "ready" and not i.replaced for i in self.instances.values()
        ):
            self._drain(inst)

    async def _health(self, inst: Instance) -> None:
        if await self.prober.healthy(inst.base_url):
            inst.health_fails = 0
            return
        inst.health_fails += 1
        if inst.health_fails >= self.config.health_failures and inst.state == "ready":
            await self._end(inst, f"failed {inst.health_fails} health checks in a row")

    def _drain(self, inst: Instance) -> None:
        inst.state, inst.drain_since, inst.idle_ticks = "draining", time.monotonic(), 0
        self.rebuild()
        self._spawn(self.store.save(inst))
        log.info("%s: draining instance %s (job %s)", self.name, inst.id, inst.job_id)

    async def _check_draining(self, inst: Instance) -> None:
        inst.idle_ticks = inst.idle_ticks + 1 if inst.quiet() else 0
        overdue = time.monotonic() - (inst.drain_since or 0) > self.config.drain_timeout
        if inst.idle_ticks >= _QUIET_TICKS or overdue:
            await self._end(inst, "drained" if not overdue else "drain_timeout reached")

    async def _end(self, inst: Instance, reason: str, cancel: bool = True) -> None:
        """Take a worker out of rotation for good, cancelling its job if it still runs."""
        was_ready = inst.deployment is not None and inst.deployment in self.ready
        inst.state, inst.reason = "ended", reason
        if inst.deployment is not None:
            self._retired.append(inst.deployment)
        if was_ready or inst.deployment is not None:
            self.rebuild()
        if cancel and inst.job_id is not None:
            await self.launcher.cancel(inst.job_id)
        log.info("%s: instance %s (job %s) ended: %s", self.name, inst.id, inst.job_id, reason)
        await self.store.save(inst)
        self._notify()

    async def cancel_again(self) -> None:
        """Cancel jobs of ended workers that the scheduler still runs (a lost scancel)."""
        for inst in self.instances.values():
            if inst.state == "ended" and inst.job_id and inst.job and inst.job.phase != "ended":
                await self.launcher.cancel(inst.job_id)

    def launch_soon(self, replacing: Instance | None = None) -> None:
        """Start one worker in the background (see `ModelPool`)."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------

    @property
    def upstream_model(self) -> str:
        """The workers' name for the model."""
        return self.config.upstream_model or self.name

    def rebuild(self) -> None:
        """Recompute the ready list after a worker joined or left rotation."""
        ready = [i for i in self.instances.values() if i.state == "ready" and i.deployment]
        self.ready = [i.deployment for i in ready if i.deployment is not None]
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task failed", self.name, exc_info=task.exception())

    async def close(self) -> None:
        """Finish or stop background tasks, close connection pools (jobs keep running)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for dep in self.ready + self._retired:
            await dep.provider.close()
