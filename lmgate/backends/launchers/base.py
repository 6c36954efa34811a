"""The launcher interface: submit a worker, ask for its state, cancel it.

One implementation per scheduler (`slurm.py`, `local.py`); nothing above this interface
knows a scheduler's commands or quirks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Phase = Literal["pending", "running", "ended"]
"""What the manager needs from a scheduler's many job states."""

FAILED_STATES = frozenset(
    {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)


@dataclass(frozen=True)
class JobSpec:
    """One worker to launch: its script (SLURM) or command (local), and its resources."""

    name: str
    script: str
    """A complete job script (shell); the local launcher runs it with bash."""
    env: dict[str, str] = field(default_factory=dict)
    options: list[str] = field(default_factory=list)
    """Scheduler options (sbatch arguments); ignored by the local launcher."""


@dataclass(frozen=True)
class JobState:
    """A job as the scheduler last reported it."""

    job_id: str
    state: str
    """The scheduler's own word: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ..."""
    phase: Phase
    node: str | None = None
    reason: str | None = None
    """Why it is pending or why it ended, in the scheduler's words."""
    started_at: float | None = None
    """Unix time the job started running."""
    ended_at: float | None = None
    time_left: float | None = None
    """Seconds until the walltime ends; None when unlimited or unknown."""

    @property
    def failed(self) -> bool:
        """Whether the job ended abnormally."""
        return self.phase == "ended" and self.state in FAILED_STATES


class LaunchError(Exception):
    """A submission the scheduler refused; `permanent` when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Launcher(Protocol):
    """Starts and stops workers on one scheduler."""

    kind: str
    """`slurm` or `local`, as stored with each job."""

    async def submit(self, spec: JobSpec) -> str:
        """Submit a job and return its id; raises LaunchError when refused."""
        ...

    async def status(self, job_ids: list[str]) -> dict[str, JobState]:
        """The state of each job; a job the scheduler no longer knows is `ended`."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Ask the scheduler to stop the job (no error if it already ended)."""
        ...

    def describe(self) -> str:
        """A short human description, e.g. `slurm via ssh root@login:22`."""
        ...

    async def close(self) -> None:
        """Release connections (SSH); jobs keep running."""
        ...
