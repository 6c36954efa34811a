"""SLURM through its command line: sbatch, squeue, scontrol, scancel and sacct.

The commands run through a `CommandRunner`, so the same code submits here or on a login
host over SSH. SLURM's quirks stay in this module:

- `squeue --json -j` ignores `-j` (22.05): squeue's text output is parsed and filtered here.
- Finished jobs stay in `squeue -t all` for MinJobAge (300 s by default), then vanish; only
  `sacct` (with accounting) still knows them.
"""

from __future__ import annotations

import contextlib
import re
from datetime import datetime

from lmgate.backends.durations import parse_duration
from lmgate.backends.launchers.base import JobSpec, JobState, LaunchError, Phase
from lmgate.backends.launchers.runners import CommandError, CommandRunner

_SQUEUE_FORMAT = "%i|%T|%N|%r|%L|%S|%e"
_SACCT_FIELDS = "JobID,State,ExitCode,Reason,NodeList,Start,End"
_PENDING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "RESV_DEL_HOLD"})
_RUNNING = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"})
_TRANSIENT = re.compile(
    r"temporarily|timed out|try again|unable to contact|socket|connection|resource busy", re.I
)


class SlurmLauncher:
    """Submits workers as batch jobs; every command goes through `runner`."""

    kind = "slurm"

    def __init__(self, runner: CommandRunner) -> None:
        self.runner = runner

    async def submit(self, spec: JobSpec) -> str:
        """`sbatch --parsable` with the script on standard input; returns the job id."""
        argv = ["sbatch", "--parsable", f"--job-name={spec.name}", *spec.options]
        try:
            result = await self.runner.run(argv, stdin=spec.script)
        except CommandError as e:
            raise LaunchError(str(e)) from e
        if not result.ok:
            message = _sbatch_error(result.stderr) or f"sbatch exited with {result.returncode}"
            raise LaunchError(message, permanent=not _TRANSIENT.search(message))
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise LaunchError(f"sbatch printed no job id: {result.stdout.strip()!r}")
        return job_id

    async def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """States from `squeue -t all`, then `sacct` for jobs squeue forgot."""
        if not job_ids:
            return {}
        wanted = set(job_ids)
        try:
            result = await self.runner.run(
                ["squeue", "-h", "--me", "-t", "all", "-o", _SQUEUE_FORMAT]
            )
        except CommandError:
            return {}  # unknown this time; ask again at the next poll
        if not result.ok:
            return {}
        states = {s.job_id: s for s in parse_squeue(result.stdout) if s.job_id in wanted}
        missing = [j for j in job_ids if j not in states]
        if missing:
            states.update(await self._sacct(missing))
        return states

    async def _sacct(self, job_ids: list[str]) -> dict[str, JobState]:
        argv = ["sacct", "-n", "-P", "-X", "-o", _SACCT_FIELDS, "-j", ",".join(job_ids)]
        try:
            result = await self.runner.run(argv)
        except CommandError:
            result = None
        found = parse_sacct(result.stdout) if result is not None and result.ok else {}
        gone = "the job left the queue and accounting does not know it"
        return {j: found.get(j) or JobState(j, "UNKNOWN", "ended", reason=gone) for j in job_ids}

    async def cancel(self, job_id: str) -> None:
        """`scancel`; a job that already ended is not an error."""
        with contextlib.suppress(CommandError):  # the next poll shows if it still runs
            await self.runner.run(["scancel", job_id])

    async def show(self, job_id: str) -> dict[str, str]:
        """`scontrol -o show job` as a dict (empty once the job is forgotten)."""
        result = await self.runner.run(["scontrol", "-o", "show", "job", job_id])
        return parse_scontrol(result.stdout) if result.ok else {}

    def describe(self) -> str:
        """`slurm (local)` or `slurm (ssh user@host:port)`."""
        return f"slurm ({self.runner.describe()})"

    async def close(self) -> None:
        """Close the transport."""
        await self.runner.close()


def sbatch_options(
    *,
    partition: str | None,
    account: str | None,
    qos: str | None,
    walltime: str | None,
    cpus: int,
    gpus: int,
    memory: str | None,
    output: str,
    extra: list[str],
) -> list[str]:
    """The sbatch arguments for a worker's resources."""
    options = [f"--cpus-per-task={cpus}", f"--output={output}", "--ntasks=1", "--nodes=1"]
    for flag, value in (
        ("--partition", partition),
        ("--account", account),
        ("--qos", qos),
        ("--time", walltime),
        ("--mem", memory),
    ):
        if value:
            options.append(f"{flag}={value}")
    if gpus:
        options.append(f"--gres=gpu:{gpus}")
    return [*options, *extra]


def parse_squeue(text: str) -> list[JobState]:
    """Lines of `squeue -h -o '%i|%T|%N|%r|%L|%S|%e'`."""
    states = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 7 or not parts[0]:
            continue
        job_id, state, node, reason, left, start, end = parts
        phase = _phase(state)
        states.append(
            JobState(
                job_id,
                state,
                phase,
                node=node or None,
                reason=None if reason in ("None", "") else reason,
                started_at=parse_time(start),
                ended_at=parse_time(end) if phase == "ended" else None,
                time_left=parse_duration(left) if phase == "running" else None,
            )
        )
    return states


def parse_sacct(text: str) -> dict[str, JobState]:
    """Lines of `sacct -n -P -X -o JobID,State,ExitCode,Reason,NodeList,Start,End`."""
    states = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 7:
            continue
        job_id, raw_state, exit_code, reason, node, start, end = parts
        state = raw_state.split()[0] if raw_state else "UNKNOWN"  # "CANCELLED by 0"
        why = [] if reason in ("None", "") else [reason]
        if state != "COMPLETED" and exit_code not in ("", "0:0"):
            why.append(f"exit code {exit_code}")
        if raw_state != state:
            why.append(raw_state.lower())
        states[job_id] = JobState(
            job_id,
            state,
            _phase(state),
            node=None if node in ("", "None assigned") else node,
            reason="; ".join(why) or None,
            started_at=parse_time(start),
            ended_at=parse_time(end),
        )
    return states


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol -o show job` output (`Key=Value` pairs on one line) as a dict."""
    fields: dict[str, str] = {}
    for token in text.strip().split(" "):
        key, sep, value = token.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def parse_time(text: str) -> float | None:
    """A SLURM timestamp (`2025-01-31T12:00:00`, local time) as Unix time; None if unset."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _phase(state: str) -> Phase:
    if state in _PENDING:
        return "pending"
    if state in _RUNNING:
        return "running"
    return "ended"


def _sbatch_error(stderr: str) -> str:
    """sbatch's most specific error line, without the `sbatch: error:` prefix."""
    lines = [ln.split("error:", 1)[-1].strip() for ln in stderr.splitlines() if "error" in ln]
    failed = [ln for ln in lines if ln.startswith("Batch job submission failed")]
    return (failed or lines or [stderr.strip()])[-1]
