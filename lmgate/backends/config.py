"""Configuration of managed backends: how a model's workers are launched, scaled and checked.

A model with `backend:` instead of a fixed upstream is served by workers the gateway starts
itself: SLURM jobs (`type: slurm`) or local processes (`type: local`). Both run the same
worker command; SLURM adds the scheduler's resources and, optionally, a login host over SSH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmgate.backends.durations import parse_duration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SshConfig(_Strict):
    """A login host that runs the SLURM commands (key authentication only)."""

    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str | None = Field(None, description="default: the local user")
    key_file: str | None = Field(None, description="private key; default: the SSH agent/~/.ssh")
    known_hosts: str | None = Field(
        None, description="known_hosts file; default ~/.ssh/known_hosts (host keys are checked)"
    )
    connect_timeout: float = Field(10.0, gt=0)


class _Common(_Strict):
    """Knobs shared by every launcher: the worker, scaling, health and telemetry."""

    command: str | None = Field(
        None,
        description="the worker command (Jinja2): e.g. `vllm serve {{ model_path }} "
        "--port {{ port }}`; the default template runs it",
    )
    model_path: str | None = Field(None, description="what the worker loads; default: the name")
    upstream_model: str | None = Field(
        None, description="the worker's name for the model; default: the public name"
    )
    env: dict[str, str] = Field(default_factory=dict, description="extra worker environment")
    host: str = Field("127.0.0.1", description="address the worker binds (`{{ host }}`)")
    port_range: tuple[int, int] = Field(
        (20000, 40000), description="ports the gateway picks from for a worker"
    )
    discovery: Literal["register", "squeue"] = Field(
        "register",
        description="`register`: the worker POSTs host:port to the gateway; `squeue`: the "
        "gateway takes the job's node and the port it assigned",
    )
    min_instances: int = Field(0, ge=0, description="0 scales to zero when idle")
    max_instances: int = Field(1, ge=1)
    target_inflight_per_instance: float = Field(
        4.0, gt=0, description="scale up when the average in flight per instance exceeds it"
    )
    scale_window: float = Field(10.0, gt=0, description="seconds of the in-flight moving average")
    idle_timeout: float = Field(600.0, gt=0, description="seconds before an idle worker stops")
    startup_timeout: float = Field(
        900.0, gt=0, description="seconds from the job starting until it must be ready"
    )
    walltime_margin: float = Field(
        600.0, ge=0, description="start a replacement this long before the walltime ends"
    )
    cold_wait: float = Field(
        0.0, ge=0, description="hold a request for a cold model this long instead of a 503"
    )
    health_interval: float = Field(5.0, gt=0)
    health_failures: int = Field(3, ge=1, description="failed checks in a row before removal")
    max_launch_failures: int = Field(3, ge=1, description="failed launches before `failed`")
    launch_backoff: float = Field(2.0, gt=0, description="first back-off; doubles per failure")
    drain_timeout: float = Field(
        300.0, gt=0, description="longest wait for in-flight requests before a worker stops"
    )
    min_update_interval: float = Field(1.0, ge=0, description="telemetry: seconds between POSTs")
    max_historic_records: int = Field(60, ge=1, description="telemetry records kept per worker")

    @model_validator(mode="after")
    def _bounds(self) -> _Common:
        if self.min_instances > self.max_instances:
            raise ValueError("min_instances cannot exceed max_instances")
        low, high = self.port_range
        if not 1024 <= low <= high <= 65535:
            raise ValueError("port_range must be two ports 1024 <= low <= high <= 65535")
        return self


class SlurmBackendConfig(_Common):
    """Workers as SLURM jobs, submitted with sbatch here or on a login host over SSH."""

    type: Literal["slurm"] = "slurm"
    template: str | None = Field(None, description="the job script (Jinja2), inline")
    template_file: str | None = Field(
        None, description="the job script (Jinja2) in a file, relative to the configuration"
    )
    gpus: int = Field(0, ge=0)
    cpus: int = Field(1, ge=1)
    memory: str | None = Field(None, description="sbatch --mem, e.g. `32G`")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    walltime: str | None = Field(None, description="sbatch --time, e.g. `04:00:00`")
    job_name: str = Field("lmgate-{{ model }}", description="sbatch --job-name (Jinja2)")
    output: str = Field("lmgate-%x-%j.out", description="sbatch --output (on the cluster)")
    sbatch_args: list[str] = Field(default_factory=list, description="extra sbatch arguments")
    ssh: SshConfig | None = Field(None, description="run the SLURM commands on this login host")

    @model_validator(mode="after")
    def _script(self) -> SlurmBackendConfig:
        if self.template and self.template_file:
            raise ValueError("give `template` or `template_file`, not both")
        if not (self.template or self.template_file or self.command):
            raise ValueError("a slurm backend needs `command`, `template` or `template_file`")
        limit = parse_duration(self.walltime) if self.walltime else None
        if limit is not None and self.walltime_margin >= limit / 2:
            raise ValueError("walltime_margin must be under half the walltime")
        return self

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str | None) -> str | None:
        if v is not None and parse_duration(v) is None:
            raise ValueError("walltime must be [days-]hours:minutes:seconds or minutes")
        return v

    def script_source(self, base_dir: Path) -> str | None:
        """The job script template's text, or None for the default one."""
        if self.template_file:
            path = Path(self.template_file)
            return (path if path.is_absolute() else base_dir / path).read_text()
        return self.template


class LocalBackendConfig(_Common):
    """Workers as local processes: for demos and machines without SLURM."""

    type: Literal["local"] = "local"
    log_dir: str | None = Field(None, description="worker logs; default: the system temp dir")

    @model_validator(mode="after")
    def _needs_command(self) -> LocalBackendConfig:
        if not self.command:
            raise ValueError("a local backend needs `command`")
        return self


BackendConfig = Annotated[SlurmBackendConfig | LocalBackendConfig, Field(discriminator="type")]


class BackendsSettings(_Strict):
    """Gateway-wide settings of managed backends."""

    public_url: str | None = Field(
        None,
        description="the gateway's URL as workers reach it (for registration and telemetry); "
        "default: http://<server.host>:<server.port>",
    )
    poll_interval: float = Field(5.0, gt=0, description="seconds between job-state polls")
    fast_poll_interval: float = Field(
        0.25, gt=0, description="seconds between polls while a worker is starting"
    )
    tick_interval: float = Field(0.5, gt=0, description="seconds between scaling decisions")
    follower_refresh: float = Field(
        2.0, gt=0, description="non-leader replicas re-read ready workers this often"
    )
    stop_jobs_on_exit: bool = Field(
        False, description="cancel every job when the gateway stops (default: adopt on restart)"
    )
    default_start_estimate: float = Field(
        10.0, gt=0, description="Retry-After basis before any start time is known"
    )

    @field_validator("public_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v
