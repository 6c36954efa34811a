"""The SLURM launcher against a real single-node SLURM: submit, state, cancel, QOS, failures,
locally and over SSH; and the parsers on SLURM's own output."""

from __future__ import annotations

import asyncio
import time

import pytest

from lmgate.backends.durations import parse_duration
from lmgate.backends.launchers.base import JobSpec, LaunchError
from lmgate.backends.launchers.runners import LocalRunner, SshRunner
from lmgate.backends.launchers.slurm import (
    SlurmLauncher,
    parse_sacct,
    parse_squeue,
    sbatch_options,
)
from tests.slurm_fixtures import JOB_PREFIX, Sshd, slurm_fixture, sshd_fixture  # noqa: F401

pytestmark = pytest.mark.usefixtures("slurm")


def job(script: str, *options: str) -> JobSpec:
    return JobSpec(
        f"{JOB_PREFIX}-unit", f"#!/bin/bash\n{script}\n", options=["--output=/dev/null", *options]
    )


async def wait_phase(launcher: SlurmLauncher, job_id: str, phase: str, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        state = (await launcher.status([job_id])).get(job_id)
        if state is not None and state.phase == phase:
            return state
        assert time.monotonic() < deadline, f"job {job_id} not {phase}: {state}"
        await asyncio.sleep(0.2)


async def test_submit_run_cancel() -> None:
    launcher = SlurmLauncher(LocalRunner())
    job_id = await launcher.submit(job("sleep 60", "--time=5"))
    assert job_id.isdigit()
    running = await wait_phase(launcher, job_id, "running")
    assert running.state == "RUNNING" and running.node
    assert running.time_left is not None and 240 < running.time_left <= 300
    assert running.started_at is not None and abs(running.started_at - time.time()) < 30
    await launcher.cancel(job_id)
    ended = await wait_phase(launcher, job_id, "ended")
    assert ended.state == "CANCELLED" and ended.failed
    await launcher.cancel(job_id)  # cancelling again is not an error


async def test_status_filters_other_jobs_and_handles_unknown_ids() -> None:
    launcher = SlurmLauncher(LocalRunner())
    a = await launcher.submit(job("sleep 30"))
    b = await launcher.submit(job("sleep 30"))
    try:
        states = await launcher.status([a, "999999"])
        assert set(states) == {a, "999999"}
        assert states["999999"].phase == "ended" and states["999999"].state == "UNKNOWN"
    finally:
        await launcher.cancel(a)
        await launcher.cancel(b)


async def test_qos_reaches_slurm() -> None:
    launcher = SlurmLauncher(LocalRunner())
    job_id = await launcher.submit(job("sleep 30", "--qos=high"))
    try:
        assert (await launcher.show(job_id))["QOS"] == "high"
    finally:
        await launcher.cancel(job_id)


async def test_invalid_qos_is_a_clear_permanent_error_at_once() -> None:
    launcher = SlurmLauncher(LocalRunner())
    started = time.monotonic()
    with pytest.raises(LaunchError) as info:
        await launcher.submit(job("sleep 1", "--qos=no-such-qos"))
    assert time.monotonic() - started < 5
    assert "Invalid qos specification" in str(info.value)
    assert info.value.permanent


async def test_a_failing_job_reports_slurms_reason() -> None:
    launcher = SlurmLauncher(LocalRunner())
    job_id = await launcher.submit(job("exit 3"))
    ended = await wait_phase(launcher, job_id, "ended")
    assert ended.state == "FAILED" and ended.failed
    assert ended.reason == "NonZeroExitCode"
    from_sacct = await launcher._sacct([job_id])  # what remains once squeue forgets the job
    assert from_sacct[job_id].state == "FAILED"
    assert "exit code 3:0" in (from_sacct[job_id].reason or "")


async def test_pending_job_and_its_reason() -> None:
    launcher = SlurmLauncher(LocalRunner())
    job_id = await launcher.submit(job("sleep 30", "--begin=now+1hour"))
    try:
        state = await wait_phase(launcher, job_id, "pending")
        assert state.state == "PENDING" and state.reason == "BeginTime"
    finally:
        await launcher.cancel(job_id)


async def test_submission_over_ssh(sshd: Sshd) -> None:
    launcher = SlurmLauncher(SshRunner(sshd.config()))
    assert launcher.describe() == f"slurm (ssh root@127.0.0.1:{sshd.port})"
    try:
        job_id = await launcher.submit(job("sleep 30", "--qos=high"))
        state = await wait_phase(launcher, job_id, "running")
        assert state.node
        assert (await launcher.show(job_id))["QOS"] == "high"
        with pytest.raises(LaunchError, match="Invalid qos"):
            await launcher.submit(job("sleep 1", "--qos=nope"))
        await launcher.cancel(job_id)
        await wait_phase(launcher, job_id, "ended")
    finally:
        await launcher.close()


async def test_ssh_rejects_an_unknown_host_key(sshd: Sshd, tmp_path) -> None:
    other = tmp_path / "known_hosts"
    other.write_text("")
    launcher = SlurmLauncher(SshRunner(sshd.config(known_hosts=str(other))))
    with pytest.raises(LaunchError, match="ssh"):
        await launcher.submit(job("true"))
    await launcher.close()


def test_parse_squeue() -> None:
    text = (
        "12|RUNNING|vm|None|4:58|2025-01-31T12:00:00|2025-01-31T12:05:00\n"
        "13|PENDING||Priority|UNLIMITED|N/A|N/A\n"
        "14|FAILED|vm|NonZeroExitCode|0:00|2025-01-31T12:00:00|2025-01-31T12:00:01\n"
        "garbage\n"
    )
    running, pending, failed = parse_squeue(text)
    assert (running.phase, running.node, running.time_left, running.reason) == (
        "running", "vm", 298.0, None)  # fmt: skip
    assert (pending.phase, pending.node, pending.reason, pending.started_at) == (
        "pending", None, "Priority", None)  # fmt: skip
    assert failed.phase == "ended" and failed.failed and failed.reason == "NonZeroExitCode"


def test_parse_sacct() -> None:
    states = parse_sacct(
        "7|CANCELLED by 0|0:15|None|vm|2025-01-31T12:00:00|2025-01-31T12:01:00\n"
        "8|COMPLETED|0:0|None|vm|2025-01-31T12:00:00|2025-01-31T12:01:00\n"
    )
    assert states["7"].state == "CANCELLED" and states["7"].phase == "ended"
    assert states["7"].reason == "exit code 0:15; cancelled by 0"
    assert states["8"].reason is None and not states["8"].failed


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("4:58", 298), ("1:00:00", 3600), ("2-00", 172800), ("1-02:03:04", 93784),
     ("UNLIMITED", None), ("N/A", None)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_sbatch_options() -> None:
    options = sbatch_options(
        partition="gpu", account="lab", qos="high", walltime="04:00:00", cpus=8, gpus=2,
        memory="64G", output="out-%j", extra=["--constraint=a100"],
    )  # fmt: skip
    assert options == [
        "--cpus-per-task=8", "--output=out-%j", "--ntasks=1", "--nodes=1", "--partition=gpu",
        "--account=lab", "--qos=high", "--time=04:00:00", "--mem=64G", "--gres=gpu:2",
        "--constraint=a100",
    ]  # fmt: skip
