"""One managed model's pool: the request path, launching, adoption and scaling.

The leader calls `tick()` every `tick_interval`; everything that talks to the scheduler or
the database happens there or in tasks it starts. The request path only reads `ready`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
import uuid
from collections import deque

from lmgate.backends.instances import ACTIVE, Instance
from lmgate.backends.jobs import Launch, build_job
from lmgate.backends.launchers.base import JobState, LaunchError
from lmgate.backends.lifecycle import PoolBase
from lmgate.backends.scaling import (
    ColdModel,
    ModelState,
    failed_message,
    retry_after,
    starting_message,
    wanted_instances,
)
from lmgate.backends.state import estimate_start, hash_secret

log = logging.getLogger("lmgate.backends")


class ModelPool(PoolBase):
    """The workers of one model and the decisions about them.

    The leader calls `tick()` every `tick_interval`; everything that talks to the scheduler
    or the database happens there or in tasks it starts. The request path only reads `ready`.
    """

    # -- the request path ---------------------------------------------------------------

    def on_request(self, may_launch: bool) -> ColdModel | None:
        """None when a worker is ready; else why not, starting one if `may_launch`."""
        self.last_request = time.monotonic()
        self.stopped = False
        if self.ready:
            return None
        if self.failed_reason is not None:
            return ColdModel(
                self.name,
                "failed",
                0,
                failed_message(self.name, self.failed_reason),
                self.failed_reason,
            )
        if may_launch and not any(i.state in ACTIVE for i in self.instances.values()):
            self.launch_soon()
        seconds = self.retry_after()
        return ColdModel(self.name, "starting", seconds, starting_message(self.name, seconds))

    def retry_after(self) -> int:
        """Seconds until a worker is expected to be ready."""
        expected = estimate_start(self.history, self.settings.default_start_estimate)
        started = [i.submitted_at for i in self.instances.values() if i.state in ACTIVE]
        elapsed = time.time() - min(started) if started else 0.0
        backoff = max(0.0, self._next_launch - time.monotonic())
        return retry_after(expected + backoff, elapsed)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until a worker is ready (True), the model failed or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        self.waiting += 1
        try:
            while not self.ready:
                remaining = deadline - time.monotonic()
                if self.failed_reason is not None or remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    return False
            return True
        finally:
            self.waiting -= 1

    def state(self) -> ModelState:
        """ready, starting, cold or failed."""
        if self.ready:
            return "ready"
        if self.failed_reason is not None:
            return "failed"
        if self._launching or any(i.state in ACTIVE for i in self.instances.values()):
            return "starting"
        if self.launch_failures and time.monotonic() < self._next_launch:
            return "starting"  # retrying after a back-off
        return "cold"

    # -- launching ----------------------------------------------------------------------

    def launch_soon(self, replacing: Instance | None = None) -> None:
        """Start one worker in the background, unless a launch is already under way."""
        if self._launching or self.failed_reason is not None:
            return
        if replacing is None and time.monotonic() < self._next_launch:
            return
        self._launching = True
        self._spawn(self._launch())

    async def _launch(self) -> None:
        try:
            inst = Instance(
                id=uuid.uuid4().hex,
                model=self.name,
                launcher=self.launcher.kind,
                secret_hash="",
                port=self._pick_port(),
                submitted_at=time.time(),
            )
            inst.telemetry = deque(maxlen=self.config.max_historic_records)
            secret = secrets.token_urlsafe(32)
            inst.secret_hash = hash_secret(secret)
            launch = Launch(self.name, inst.id, inst.port, secret, self.gateway_url)
            self.instances[inst.id] = inst
            await self.store.save(inst)  # first, so that a crash leaves a trace
            try:
                spec = build_job(self.config, launch, self.base_dir)
                inst.job_id = await self.launcher.submit(spec)
            except (LaunchError, ValueError, OSError) as e:
                permanent = not isinstance(e, LaunchError) or e.permanent
                await self._end(inst, f"submission failed: {e}")
                await self._launch_failed(str(e), permanent)
                return
            log.info("%s: submitted instance %s as job %s", self.name, inst.id, inst.job_id)
            await self.store.save(inst)
        finally:
            self._launching = False

    def _pick_port(self) -> int:
        low, high = self.config.port_range
        for _ in range(20):
            port = random.randint(low, high)
            with socket.socket() as s:
                try:
                    s.bind((self.config.host, port))
                except OSError:
                    continue
            return port
        return random.randint(low, high)

    def clear_failure(self) -> None:
        """Forget past failures: the next request or tick may launch again."""
        self.failed_reason = None
        self.launch_failures = 0
        self._next_launch = 0.0

    async def adopt(self, inst: Instance, alive: bool) -> None:
        """Take over a worker a previous gateway started (its job is `alive` or not)."""
        self.instances[inst.id] = inst
        if not alive or inst.job_id is None:
            await self._end(inst, inst.job.state if inst.job else "lost during submission", False)
            return
        if inst.state in ("ready", "draining") and inst.host:
            if await self.prober.ready(inst.base_url):
                inst.deployment = self.make_deployment(inst.base_url, self.upstream_model)
                inst.drain_since = time.monotonic() if inst.state == "draining" else None
                self.rebuild()
                return
            inst.state, inst.started_at = "starting", time.time()  # a fresh startup_timeout
        log.info(
            "%s: adopted instance %s (job %s, %s)", self.name, inst.id, inst.job_id, inst.state
        )
        await self.store.save(inst)

    # -- following jobs -----------------------------------------------------------------

    def apply_job_states(self, states: dict[str, JobState]) -> None:
        """Record what the scheduler said about this pool's jobs."""
        now = time.monotonic()
        for inst in self.instances.values():
            state = states.get(inst.job_id or "")
            if state is not None:
                inst.job, inst.job_seen_at = state, now

    async def tick(self) -> None:
        """Follow jobs, check readiness and health, drain, scale. Leader only."""
        for inst in list(self.instances.values()):
            await self._follow(inst)
        self._scale()
        for dep in [d for d in self._retired if d.inflight == 0]:
            self._retired.remove(dep)
            await dep.provider.close()

    # -- scaling --------------------------------------------------------------------------

    def _scale(self) -> None:
        now = time.monotonic()
        ready = [i for i in self.instances.values() if i.state == "ready" and not i.replaced]
        active = [i for i in self.instances.values() if i.state in ACTIVE and not i.replaced]
        load = sum(i.inflight + i.external_load() for i in ready) + self.waiting
        average = self._load.add(load, now)
        in_demand = not self.stopped and now - self.last_request < self.config.idle_timeout
        wanted = wanted_instances(
            average,
            self.config.target_inflight_per_instance,
            in_demand=in_demand,
            min_instances=0 if self.stopped else self.config.min_instances,
            max_instances=self.config.max_instances,
        )
        if wanted > len(active):
            self._below_since = None
            if not any(i.state == "submitted" for i in active):  # never pile up PENDING jobs
                self.launch_soon()
        elif wanted < len(ready):
            if self._below_since is None:
                self._below_since = now
            if not in_demand or now - self._below_since >= self.config.idle_timeout:
                for inst in sorted(ready, key=lambda i: i.inflight)[: len(ready) - wanted]:
                    self._drain(inst)
                self._below_since = None
        else:
            self._below_since = None

    def stop(self) -> None:
        """Drain every worker now; the next request starts the model again."""
        self.stopped = True
        self.last_request = -float("inf")
        for inst in list(self.instances.values()):
            if inst.state == "ready":
                self._drain(inst)
            elif inst.state in ("submitted", "starting"):
                self._spawn(self._end(inst, "stopped"))

    async def stop_now(self) -> None:
        """Cancel every job at once (the gateway stops with `stop_jobs_on_exit`)."""
        for inst in list(self.instances.values()):
            if inst.state != "ended":
                await self._end(inst, "the gateway stopped")
