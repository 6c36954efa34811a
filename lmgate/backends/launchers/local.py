"""Workers as local processes: the job script runs under bash in its own session.

A job id is `PID:START` (the process's start time in clock ticks, from /proc), so that a
restarted gateway adopts its workers by id without mistaking a recycled PID for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from lmgate.backends.launchers.base import JobSpec, JobState, LaunchError

_KILL_AFTER = 10.0


class LocalLauncher:
    """Starts each worker as a detached `bash` process; it survives a gateway restart."""

    kind = "local"

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.gettempdir())
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._cancelled: set[str] = set()
        self._started: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, spec: JobSpec) -> str:
        """Start the script; returns `PID:START`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}-{int(time.time() * 1000)}.log"
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    ["bash", "-c", spec.script],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **spec.env},
                    start_new_session=True,
                )
        except OSError as e:
            raise LaunchError(f"cannot start the worker: {e}", permanent=True) from e
        job_id = f"{proc.pid}:{_start_ticks(proc.pid)}"
        self._children[job_id] = proc
        self._started[job_id] = time.time()
        return job_id

    async def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """Running while the process lives; its exit status says how it ended."""
        return {job_id: self._state(job_id) for job_id in job_ids}

    def _state(self, job_id: str) -> JobState:
        started = self._started.get(job_id)
        proc = self._children.get(job_id)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return JobState(job_id, "RUNNING", "running", started_at=started)
            del self._children[job_id]
            return self._ended(job_id, code)
        pid, _, ticks = job_id.partition(":")
        if pid.isdigit() and _start_ticks(int(pid)) == ticks and not _zombie(int(pid)):
            return JobState(job_id, "RUNNING", "running", started_at=started)
        return self._ended(job_id, None)

    def _ended(self, job_id: str, code: int | None) -> JobState:
        now = time.time()
        if job_id in self._cancelled:
            return JobState(job_id, "CANCELLED", "ended", reason="cancelled", ended_at=now)
        if code == 0:
            return JobState(job_id, "COMPLETED", "ended", ended_at=now)
        if code is None:
            return JobState(job_id, "UNKNOWN", "ended", reason="the process is gone", ended_at=now)
        why = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return JobState(job_id, "FAILED", "ended", reason=why, ended_at=now)

    async def cancel(self, job_id: str) -> None:
        """SIGTERM to the worker's process group, SIGKILL if it is still there later."""
        self._cancelled.add(job_id)
        pid = int(job_id.partition(":")[0])
        if not _signal(pid, signal.SIGTERM):
            return
        task = asyncio.create_task(self._kill_later(job_id, pid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _kill_later(self, job_id: str, pid: int) -> None:
        deadline = time.monotonic() + _KILL_AFTER
        while time.monotonic() < deadline:
            if self._state(job_id).phase == "ended":
                return
            await asyncio.sleep(0.1)
        _signal(pid, signal.SIGKILL)

    def describe(self) -> str:
        """`local processes`."""
        return "local processes"

    async def close(self) -> None:
        """Forget the children (they keep running, to be adopted by the next gateway)."""
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _signal(pid: int, signum: int) -> bool:
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _stat_fields(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return raw.rpartition(")")[2].split()  # after the command name, which may hold spaces


def _start_ticks(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else "0"


def _zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return not fields or fields[0] in ("Z", "X")
