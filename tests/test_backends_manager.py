"""The backend manager's life cycle with the local launcher: cold start, scaling up and down
to zero, replacement, start-up timeout, failed launches, adoption after a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from lmgate.backends.manager import BackendManager
from lmgate.routing.deployment import attempt_order
from lmgate.storage.db import Database
from lmgate.upstream.client import BodyBroken, ConnectFailed
from tests.slurm_fixtures import STUB, InternalServer, internal_fixture, new_manager  # noqa: F401

WORKER = (
    STUB + " --host {{ host }} --port {{ port }} --models {{ upstream_model }}"
    " --register {{ register_url }} --telemetry {{ telemetry_url }} --telemetry-interval 0.5"
)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/lmgate.db")
    await database.upgrade()
    yield database
    await database.close()


def local(**overrides: Any) -> dict[str, Any]:
    return {"type": "local", "command": WORKER, "health_interval": 0.5, **overrides}


async def chat(manager: BackendManager, model: str, delay: float = 0.0) -> str:
    """One chat completion through the manager's ready workers, as the relay would send it:
    the least busy first, another one if a worker cannot be reached."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if delay:
        body["stub"] = {"delay": delay}
    for _ in range(20):
        deployments = manager.deployments(model)
        if not deployments:
            if manager.on_request(model) is not None:
                await manager.wait_ready(model, 30)
            continue
        dep = attempt_order(deployments, 1)[0]
        dep.inflight += 1
        try:
            resp = await dep.provider.request("POST", "/chat/completions", orjson.dumps(body))
            try:
                status, raw = resp.status, await resp.read()
            finally:
                resp.release()
        except (ConnectFailed, BodyBroken):
            await asyncio.sleep(0.1)
            continue
        finally:
            dep.inflight -= 1
        assert status == 200, raw
        return str(orjson.loads(raw)["choices"][0]["message"]["content"])
    raise AssertionError("no worker answered")


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def live(manager: BackendManager, model: str) -> list[Any]:
    return [i for i in manager.pools[model].instances.values() if i.state != "ended"]


async def test_cold_request_launches_exactly_once(db: Database, internal: InternalServer) -> None:
    manager = await new_manager({"m": local()}, db, internal)
    try:
        assert manager.model_states()["m"]["state"] == "cold"
        answers = [manager.on_request("m") for _ in range(50)]
        assert all(a is not None and a.state == "starting" for a in answers)
        assert answers[0] is not None and 1 <= answers[0].retry_after <= 60
        assert "starting" in answers[0].message
        await until(lambda: live(manager, "m"), 5, "a launch")
        assert len(live(manager, "m")) == 1
        assert manager.model_states()["m"]["state"] == "starting"
        assert await manager.wait_ready("m", 20)
        assert manager.on_request("m") is None
        assert "stub worker" in await chat(manager, "m")
        assert manager.model_states()["m"] == {
            "state": "ready", "reason": None, "ready_instances": 1, "instances": 1,
        }  # fmt: skip
        assert len(internal.registrations) == 1
        await asyncio.sleep(0.5)  # the start time is written after the worker joins
        assert (await manager.store.start_times("m"))[0] > 0
    finally:
        await manager.stop_model("m")
        await until(lambda: not live(manager, "m"), 10, "the stop")
        await manager.close()


async def test_scales_up_under_load_then_to_zero_without_cutting_requests(
    db: Database, internal: InternalServer
) -> None:
    config = local(max_instances=3, target_inflight_per_instance=1, idle_timeout=1.5,
                   scale_window=0.5)  # fmt: skip
    manager = await new_manager({"m": config}, db, internal)
    try:
        peak = 0
        results: list[str] = []

        async def client() -> None:
            while len(manager.deployments("m")) < 3 and time.monotonic() < stop_at:
                results.append(await chat(manager, "m", delay=0.3))

        stop_at = time.monotonic() + 40
        tasks = [asyncio.create_task(client()) for _ in range(6)]
        while not all(t.done() for t in tasks):
            peak = max(peak, len(manager.deployments("m")))
            await asyncio.sleep(0.05)
        for t in tasks:
            t.result()  # no request failed
        assert peak == 3
        assert len(live(manager, "m")) == 3  # never more than max_instances
        slow = [asyncio.create_task(chat(manager, "m", delay=2.5)) for _ in range(3)]
        await until(lambda: not live(manager, "m"), 30, "scale to zero")
        assert all("stub worker" in r for r in await asyncio.gather(*slow))  # none was cut
        assert manager.model_states()["m"]["state"] == "cold"
    finally:
        await manager.close()


async def test_a_killed_worker_is_replaced(db: Database, internal: InternalServer) -> None:
    manager = await new_manager({"m": local(min_instances=2, max_instances=2)}, db, internal)
    try:
        await until(lambda: len(manager.deployments("m")) == 2, 30, "two workers")
        victim = live(manager, "m")[0]
        os.killpg(int(victim.job_id.split(":")[0]), signal.SIGKILL)
        for _ in range(20):
            assert "stub worker" in await chat(manager, "m")
        await until(lambda: victim.state == "ended", 10, "the dead worker to leave")
        assert victim.reason and "signal 9" in victim.reason
        await until(lambda: len(manager.deployments("m")) == 2, 30, "a replacement")
        assert victim.deployment not in manager.deployments("m")
    finally:
        await manager.close()
        for inst in list(manager.pools["m"].instances.values()):
            await manager.pools["m"].launcher.cancel(inst.job_id)


async def test_a_worker_never_ready_is_cancelled_after_startup_timeout(
    db: Database, internal: InternalServer
) -> None:
    config = local(command=WORKER + " --startup-delay 600", startup_timeout=1.0,
                   max_launch_failures=2, launch_backoff=0.1)  # fmt: skip
    manager = await new_manager({"m": config}, db, internal)
    try:
        manager.on_request("m")
        await until(lambda: live(manager, "m"), 5, "a launch")
        first = live(manager, "m")[0]
        await until(lambda: first.state == "ended", 10, "the timeout")
        assert "startup_timeout" in (first.reason or "")
        await until(lambda: manager.model_states()["m"]["state"] == "failed", 15, "failure")
        assert "not ready within 1 s" in manager.model_states()["m"]["reason"]
        pid = int(first.job_id.split(":")[0])
        await until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 5, "the kill")
    finally:
        await manager.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


async def test_launches_that_keep_failing_mark_the_model_failed(
    db: Database, internal: InternalServer
) -> None:
    config = local(command="echo 'no GPU here' >&2; exit 7", max_launch_failures=2,
                   launch_backoff=0.1)  # fmt: skip
    manager = await new_manager({"m": config}, db, internal)
    try:
        manager.on_request("m")
        await until(lambda: manager.model_states()["m"]["state"] == "failed", 15, "failure")
        cold = manager.on_request("m")
        assert cold is not None and cold.state == "failed"
        assert cold.reason and "exit code 7" in cold.reason
        assert not await manager.wait_ready("m", 1)
        assert manager.pools["m"].launch_failures == 2
    finally:
        await manager.close()
    again = await new_manager({"m": config}, db, internal)  # the failure is remembered
    try:
        assert again.model_states()["m"]["state"] == "failed"
    finally:
        await again.close()


async def test_restart_adopts_running_workers(db: Database, internal: InternalServer) -> None:
    first = await new_manager({"m": local(min_instances=1)}, db, internal)
    await until(lambda: first.deployments("m"), 30, "a worker")
    job_ids = {i.job_id for i in live(first, "m")}
    await first.close()
    second = await new_manager({"m": local(min_instances=1)}, db, internal)
    try:
        assert second.deployments("m")  # ready at once
        await asyncio.sleep(1.0)
        assert {i.job_id for i in live(second, "m")} == job_ids
        assert len(internal.registrations) == 1  # nothing new was launched
        assert "stub worker" in await chat(second, "m")
    finally:
        await second.stop_model("m")
        await until(lambda: not live(second, "m"), 10, "the stop")
        await second.close()


async def test_internal_endpoints_check_the_secret_and_rate(
    db: Database, internal: InternalServer
) -> None:
    manager = await new_manager({"m": local(min_update_interval=10)}, db, internal)
    try:
        manager.on_request("m")
        await until(lambda: manager.deployments("m"), 20, "a worker")
        inst = live(manager, "m")[0]
        body = {"instance": inst.id, "host": "127.0.0.1", "port": inst.port}
        assert (await manager.handle_register(body, "wrong"))[0] == 401
        assert (await manager.handle_register({**body, "port": "x"}, "wrong"))[0] == 400
        assert (await manager.handle_telemetry({"instance": inst.id}, "wrong"))[0] == 401
        assert (await manager.handle_telemetry({"instance": "nope"}, "x"))[0] == 404
        await until(lambda: inst.telemetry, 5, "the worker's telemetry")
        assert inst.telemetry[-1].running == 0
        rows = manager.snapshot()
        assert rows[0]["model"] == "m" and rows[0]["state"] == "ready"
        assert rows[0]["endpoint"] == f"127.0.0.1:{inst.port}"
    finally:
        await manager.stop_model("m")
        await until(lambda: not live(manager, "m"), 10, "the stop")
        await manager.close()
