"""The backend manager on a real single-node SLURM: stub workers as batch jobs."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lmgate.backends.launchers.slurm import SlurmLauncher
from lmgate.backends.manager import BackendManager
from lmgate.storage.db import Database
from tests.slurm_fixtures import (  # noqa: F401
    JOB_PREFIX,
    STUB,
    InternalServer,
    Sshd,
    internal_fixture,
    new_manager,
    slurm_fixture,
    sshd_fixture,
)
from tests.test_backends_manager import WORKER, chat, live, until

pytestmark = pytest.mark.usefixtures("slurm")


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path}/lmgate.db")
    await database.upgrade()
    yield database
    await database.close()


@pytest.fixture
def out(tmp_path: Path) -> str:
    return str(tmp_path / "job-%j.out")


def slurm_config(out: str, **overrides: Any) -> dict[str, Any]:
    return {
        "type": "slurm",
        "command": WORKER,
        "output": out,
        "job_name": JOB_PREFIX + "-{{ model }}",
        "walltime": "30",
        "health_interval": 0.5,
        **overrides,
    }


def squeue_ids() -> set[str]:
    text = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    return {ln.split()[0] for ln in text.splitlines() if JOB_PREFIX in ln}


async def shutdown(manager: BackendManager) -> None:
    for pool in manager.pools.values():
        await pool.stop_now()
    await manager.close()


async def test_cold_start_as_a_slurm_job_and_the_gateways_overhead(
    db: Database, internal: InternalServer, out: str
) -> None:
    model = slurm_config(out, qos="high", command=WORKER + " --startup-delay 1")
    manager = await new_manager({"m": model}, db, internal)
    try:
        started = time.monotonic()
        cold = manager.on_request("m")
        assert cold is not None and cold.state == "starting" and 1 <= cold.retry_after <= 60
        assert await manager.wait_ready("m", 30)
        assert "stub worker" in await chat(manager, "m")
        total = time.monotonic() - started
        worker = internal.registrations[0]["startup_seconds"]
        overhead = total - worker
        print(f"\ncold start: total {total:.2f} s, worker {worker:.2f} s, gateway {overhead:.2f} s")
        # A measurement, not a timed assertion: the target (< 1.5 s) is tracked in
        # docs/performance.md; SLURM's own dispatch (0.2-3 s) is part of this figure.
        assert overhead < 15
        inst = live(manager, "m")[0]
        launcher = manager.pools["m"].launcher
        assert isinstance(launcher, SlurmLauncher)
        assert (await launcher.show(inst.job_id))["QOS"] == "high"
        assert inst.time_left() is not None and 1700 < inst.time_left() <= 1800
    finally:
        await shutdown(manager)


async def test_an_invalid_qos_fails_the_model_at_once_with_slurms_message(
    db: Database, internal: InternalServer, out: str
) -> None:
    manager = await new_manager({"m": slurm_config(out, qos="no-such-qos")}, db, internal)
    try:
        started = time.monotonic()
        manager.on_request("m")
        await until(lambda: manager.model_states()["m"]["state"] == "failed", 10, "failure")
        assert time.monotonic() - started < 5
        assert "Invalid qos specification" in manager.model_states()["m"]["reason"]
    finally:
        await manager.close()


async def test_jobs_that_keep_failing_report_slurms_reason(
    db: Database, internal: InternalServer, out: str
) -> None:
    config = slurm_config(out, command="exit 3", max_launch_failures=2, launch_backoff=0.1)
    manager = await new_manager({"m": config}, db, internal)
    try:
        manager.on_request("m")
        await until(lambda: manager.model_states()["m"]["state"] == "failed", 30, "failure")
        assert "FAILED: NonZeroExitCode" in manager.model_states()["m"]["reason"]
    finally:
        await manager.close()


async def test_scancel_of_a_worker_keeps_requests_succeeding_and_replaces_it(
    db: Database, internal: InternalServer, out: str
) -> None:
    config = slurm_config(out, min_instances=2, max_instances=2)
    manager = await new_manager({"m": config}, db, internal)
    try:
        await until(lambda: len(manager.deployments("m")) == 2, 30, "two workers")
        victim = live(manager, "m")[0]
        subprocess.run(["scancel", victim.job_id], check=True)
        for _ in range(30):
            assert "stub worker" in await chat(manager, "m")
            await asyncio.sleep(0.05)
        await until(lambda: victim.state == "ended", 15, "the cancelled worker to leave")
        await until(lambda: len(manager.deployments("m")) == 2, 30, "a replacement")
        assert victim.job_id not in {i.job_id for i in live(manager, "m")}
        assert "CANCELLED" in (victim.reason or "")
    finally:
        await shutdown(manager)


async def test_a_job_never_ready_is_cancelled_after_startup_timeout(
    db: Database, internal: InternalServer, out: str
) -> None:
    config = slurm_config(out, command=WORKER + " --startup-delay 600", startup_timeout=2,
                          max_launch_failures=5, launch_backoff=30)  # fmt: skip
    manager = await new_manager({"m": config}, db, internal)
    try:
        manager.on_request("m")
        await until(lambda: live(manager, "m"), 5, "a launch")
        first = live(manager, "m")[0]
        await until(lambda: first.state == "ended", 15, "the start-up timeout")
        assert "startup_timeout" in (first.reason or "")
        await until(lambda: first.job_id not in squeue_ids() or _state(first.job_id) != "RUNNING",
                    10, "the job to be cancelled")  # fmt: skip
        assert manager.model_states()["m"]["state"] == "starting"  # retried after a back-off
        assert manager.on_request("m").retry_after >= 20  # type: ignore[union-attr]
    finally:
        await shutdown(manager)


def _state(job_id: str) -> str:
    return subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()


async def test_a_restarted_gateway_adopts_running_jobs(
    db: Database, internal: InternalServer, out: str
) -> None:
    config = slurm_config(out, min_instances=2, max_instances=2)
    first = await new_manager({"m": config}, db, internal)
    await until(lambda: len(first.deployments("m")) == 2, 30, "two workers")
    jobs = {i.job_id for i in live(first, "m")}
    await first.close()
    assert jobs <= squeue_ids()
    before = squeue_ids()
    second = await new_manager({"m": config}, db, internal)
    try:
        assert len(second.deployments("m")) == 2
        await asyncio.sleep(2)
        assert {i.job_id for i in live(second, "m")} == jobs
        assert squeue_ids() == before  # no new sbatch, no orphan
        assert len(internal.registrations) == 2
        assert "stub worker" in await chat(second, "m")
    finally:
        await shutdown(second)


async def test_submission_over_ssh_with_squeue_discovery(
    db: Database, internal: InternalServer, out: str, sshd: Sshd
) -> None:
    command = STUB + " --host 0.0.0.0 --port {{ port }}"
    config = slurm_config(out, command=command, discovery="squeue",
                          ssh=sshd.config().model_dump())  # fmt: skip
    manager = await new_manager({"m": config}, db, internal)
    try:
        manager.on_request("m")
        assert await manager.wait_ready("m", 30)
        inst = live(manager, "m")[0]
        assert inst.host == "vm" or inst.host
        assert internal.registrations == []  # found through squeue, not registered
        assert "stub worker" in await chat(manager, "m")
        assert manager.pools["m"].launcher.describe().startswith("slurm (ssh root@127.0.0.1")
    finally:
        await shutdown(manager)
