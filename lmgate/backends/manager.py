"""The gateway's entry point to managed backends.

`BackendManager` owns one `ModelPool` per managed model, the launchers they share, the
background loop (job polling, scaling, leader election) and the internal endpoints that
workers call. Every replica routes to ready workers; only the leader launches and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from lmgate.backends.config import (
    BackendConfig,
    BackendsSettings,
    LocalBackendConfig,
    SlurmBackendConfig,
)
from lmgate.backends.health import Leadership, Prober
from lmgate.backends.instances import TelemetryRecord
from lmgate.backends.launchers import make_launcher
from lmgate.backends.launchers.base import Launcher
from lmgate.backends.lifecycle import MakeDeployment
from lmgate.backends.pool import ModelPool
from lmgate.backends.scaling import ColdModel
from lmgate.backends.state import BackendStore, instance_from_row, secret_matches
from lmgate.routing.deployment import Deployment
from lmgate.storage.db import Database
from lmgate.storage.timeutil import utcnow

log = logging.getLogger("lmgate.backends")

Reply = tuple[int, dict[str, Any]]
_REQUEST_DEBOUNCE = 1.0


class BackendManager:
    """Managed models: which workers are ready, and the loop that keeps them so."""

    def __init__(
        self,
        models: dict[str, BackendConfig],
        settings: BackendsSettings,
        db: Database,
        make_deployment: MakeDeployment,
        *,
        gateway_url: str = "http://127.0.0.1:4000",
        base_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.store = BackendStore(db)
        self.prober = Prober()
        self.leadership = Leadership(db)
        url = settings.public_url or gateway_url.rstrip("/")
        launchers: dict[str, Launcher] = {}
        self.pools: dict[str, ModelPool] = {}
        for name, config in models.items():
            key = _launcher_key(config)
            launcher = launchers.get(key) or launchers.setdefault(key, make_launcher(config))
            self.pools[name] = ModelPool(
                name,
                config,
                launcher,
                self.store,
                self.prober,
                settings,
                make_deployment,
                url,
                base_dir or Path.cwd(),
            )
        self.launchers = list(launchers.values())
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, tuple[float | None, float | None]] = {}
        self._asked: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def is_leader(self) -> bool:
        """Whether this replica launches and stops workers."""
        return self.leadership.is_leader

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Take leadership if free, adopt running workers, start the background loop."""
        requests = await self.store.requests(list(self.pools))
        for name, pool in self.pools.items():
            pool.history = await self.store.start_times(name)
            req = requests.get(name)
            if req is not None:
                pool.failed_reason = req.failed_reason
                self._seen[name] = (req.start_requested_at, req.stop_requested_at)
        if await self.leadership.try_acquire():
            await self._adopt()
        else:
            await self._refresh_ready()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        """Stop the loop. Jobs keep running (adopted at the next start) unless
        `stop_jobs_on_exit` is set."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.settings.stop_jobs_on_exit and self.is_leader:
            for pool in self.pools.values():
                await pool.stop_now()
        for pool in self.pools.values():
            await pool.close()
        for launcher in self.launchers:
            await launcher.close()
        await self.prober.close()
        await self.leadership.release()

    async def _adopt(self) -> None:
        rows = await self.store.live(list(self.pools))
        for launcher in self.launchers:
            mine = [r for r in rows if self.pools[r.model].launcher is launcher]
            states = await launcher.status([r.job_id for r in mine if r.job_id])
            for row in mine:
                pool = self.pools[row.model]
                inst = instance_from_row(row, pool.config.max_historic_records)
                inst.job = states.get(row.job_id or "")
                inst.job_seen_at = time.monotonic()
                alive = inst.job is not None and inst.job.phase != "ended"
                await pool.adopt(inst, alive)

    async def _loop(self) -> None:
        next_poll = next_refresh = 0.0
        while True:
            now = time.monotonic()
            try:
                if now >= next_refresh:
                    next_refresh = now + self.settings.follower_refresh
                    await self._refresh()
                if self.is_leader:
                    if now >= next_poll:
                        next_poll = now + await self._poll()
                    for pool in self.pools.values():
                        await pool.tick()
            except Exception:
                log.exception("managed backends: loop iteration failed")
            await asyncio.sleep(self.settings.tick_interval)

    async def _refresh(self) -> None:
        """Leader election, then: followers re-read ready workers, the leader the requests."""
        was_leader = self.is_leader
        leader = await self.leadership.try_acquire()
        if leader and not was_leader:
            log.info("managed backends: this replica is now the leader")
            for pool in self.pools.values():
                pool.instances.clear()
            await self._adopt()
        if not leader:
            await self._refresh_ready()
            return
        for name, req in (await self.store.requests(list(self.pools))).items():
            pool = self.pools[name]
            if req.failed_reason is None and pool.failed_reason is not None:
                pool.clear_failure()  # `lmgate backends start`
            seen_start, seen_stop = self._seen.get(name, (None, None))
            if req.stop_requested_at and req.stop_requested_at != seen_stop:
                pool.stop()
            if req.start_requested_at and req.start_requested_at != seen_start:
                pool.on_request(may_launch=True)
            self._seen[name] = (req.start_requested_at, req.stop_requested_at)

    async def _poll(self) -> float:
        """Ask each launcher about its jobs; returns the seconds until the next poll."""
        busy = False
        for launcher in self.launchers:
            pools = [p for p in self.pools.values() if p.launcher is launcher]
            ids = [i.job_id for p in pools for i in p.instances.values() if i.job_id]
            states = await launcher.status(ids)
            for pool in pools:
                pool.apply_job_states(states)
                await pool.cancel_again()
                busy = busy or any(i.state != "ready" for i in pool.instances.values())
                for inst in pool.instances.values():
                    if inst.state == "ready":
                        await self.store.save(inst)  # in flight and walltime for the CLI
        s = self.settings
        return s.fast_poll_interval if busy else s.poll_interval

    async def _refresh_ready(self) -> None:
        """A follower routes to the workers the leader marked ready in the database."""
        rows = [r for r in await self.store.live(list(self.pools)) if r.state == "ready"]
        for name, pool in self.pools.items():
            mine = {r.id: r for r in rows if r.model == name and r.host and r.port}
            for gone in [i for i in pool.instances if i not in mine]:
                pool.instances.pop(gone)
            for row in mine.values():
                if row.id not in pool.instances:
                    inst = instance_from_row(row, pool.config.max_historic_records)
                    inst.deployment = pool.make_deployment(inst.base_url, pool.upstream_model)
                    pool.instances[row.id] = inst
            pool.rebuild()

    # -- the request path -------------------------------------------------------------------

    def manages(self, model: str) -> bool:
        """Whether `model` is a managed model."""
        return model in self.pools

    def deployments(self, model: str) -> list[Deployment]:
        """The deployments of `model`'s ready workers (cheap: called on every request)."""
        pool = self.pools.get(model)
        return pool.ready if pool is not None else []

    def on_request(self, model: str) -> ColdModel | None:
        """Note a request for `model`. None if a worker is ready; else a ColdModel to answer
        with (a 503 and Retry-After), after starting exactly one worker if none is starting."""
        pool = self.pools[model]
        cold = pool.on_request(may_launch=self.is_leader)
        if cold is not None and not self.is_leader and cold.state != "failed":
            now = time.monotonic()
            if now - self._asked.get(model, -_REQUEST_DEBOUNCE) >= _REQUEST_DEBOUNCE:
                self._asked[model] = now
                self._spawn(self.store.set_model(model, start_requested_at=utcnow()))
        return cold

    async def wait_ready(self, model: str, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a ready worker of `model`."""
        return await self.pools[model].wait_ready(timeout)

    def cold_wait(self, model: str) -> float:
        """Seconds the gateway should hold a request for a cold `model` (0: answer 503)."""
        return self.pools[model].config.cold_wait

    # -- internal endpoints -------------------------------------------------------------------

    async def handle_register(self, payload: dict[str, Any], secret: str) -> Reply:
        """`POST /internal/backends/register` from a worker: `{instance, host, port}`."""
        instance_id, host, port = payload.get("instance"), payload.get("host"), payload.get("port")
        if not (isinstance(instance_id, str) and isinstance(host, str) and host):
            return _error(400, "give `instance` and `host` as strings")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return _error(400, "`port` must be a TCP port")
        inst = next((p.instances[instance_id] for p in self.pools.values()
                     if instance_id in p.instances), None)  # fmt: skip
        if inst is None or not self.is_leader:
            row = await self.store.get(instance_id)
            if row is None or not secret_matches(secret, row.secret_hash):
                return _error(401, "unknown instance or wrong secret")
            if row.state == "ended":
                return _error(410, "this instance has been stopped")
            await self.store.register(instance_id, host, port)
            return 200, {"status": "registered"}
        if not secret_matches(secret, inst.secret_hash):
            return _error(401, "unknown instance or wrong secret")
        if inst.state == "ended":
            return _error(410, "this instance has been stopped")
        inst.host, inst.port = host, port
        pool = self.pools[inst.model]
        if inst.state == "submitted":
            await pool.mark_started(inst)
        pool.probe(inst)
        return 200, {"status": "registered"}

    async def handle_telemetry(self, payload: dict[str, Any], secret: str) -> Reply:
        """`POST /internal/backends/telemetry`: `{instance, running, waiting, kv_cache,
        tokens_per_s}`, at most once per `min_update_interval`."""
        instance_id = payload.get("instance")
        pool = next((p for p in self.pools.values() if instance_id in p.instances), None)
        if pool is None or not isinstance(instance_id, str):
            return _error(404, "unknown instance")
        inst = pool.instances[instance_id]
        if not secret_matches(secret, inst.secret_hash):
            return _error(401, "unknown instance or wrong secret")
        now = time.monotonic()
        interval = pool.config.min_update_interval
        if inst.telemetry and now - inst.telemetry[-1].at < interval:
            return _error(429, f"send telemetry at most every {interval:g} s")
        try:
            record = TelemetryRecord.from_payload(payload, now)
        except ValueError as e:
            return _error(400, str(e))
        inst.telemetry.append(record)
        if inst.deployment is not None:  # balancing counts load from elsewhere too
            inst.deployment.weight = 1.0 / (1.0 + inst.external_load())
        return 200, {"status": "ok"}

    # -- visibility and control -----------------------------------------------------------------

    def model_states(self) -> dict[str, dict[str, Any]]:
        """Per model: `state` (ready/starting/cold/failed), `reason`, ready and total workers."""
        return {
            name: {
                "state": pool.state(),
                "reason": pool.failed_reason,
                "ready_instances": len(pool.ready),
                "instances": sum(i.state != "ended" for i in pool.instances.values()),
            }
            for name, pool in self.pools.items()
        }

    def snapshot(self) -> list[dict[str, Any]]:
        """Every live worker as this replica knows it (for `lmgate backends` and the admin)."""
        now = time.time()
        rows = []
        for name, pool in self.pools.items():
            for inst in pool.instances.values():
                if inst.state == "ended":
                    continue
                rows.append(
                    {
                        "model": name,
                        "instance": inst.id,
                        "job_id": inst.job_id,
                        "state": inst.state,
                        "endpoint": inst.endpoint,
                        "inflight": inst.inflight,
                        "age": now - inst.submitted_at,
                        "walltime_left": inst.time_left(),
                        "telemetry": inst.telemetry[-1].__dict__ if inst.telemetry else None,
                    }
                )
        return rows

    async def start_model(self, model: str) -> None:
        """Clear a failure and start a worker (from any replica)."""
        pool = self.pools[model]
        pool.clear_failure()
        pool.on_request(may_launch=self.is_leader)
        await self.store.set_model(model, failed_reason=None, start_requested_at=utcnow())

    async def stop_model(self, model: str) -> None:
        """Drain and stop every worker of `model` (from any replica)."""
        if self.is_leader:
            self.pools[model].stop()
        await self.store.set_model(model, stop_requested_at=utcnow())

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _launcher_key(config: SlurmBackendConfig | LocalBackendConfig) -> str:
    if isinstance(config, LocalBackendConfig):
        return f"local:{config.log_dir}"
    return f"slurm:{config.ssh.model_dump_json() if config.ssh else ''}"


def _error(status: int, message: str) -> Reply:
    return status, {"error": {"message": message, "type": "invalid_request_error"}}
