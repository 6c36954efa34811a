"""Turning a backend configuration into a job: the rendered script, environment and options.

Templates are Jinja2 with these variables: `model`, `upstream_model`, `model_path`, `host`,
`port`, `instance_id`, `register_url`, `telemetry_url`, `gpus`, `cpus`, `memory`,
`partition`, `account`, `qos`, `walltime`, `env`, `python` (the gateway's interpreter),
`command` (the rendered worker command) and `exports` (shell `export` lines for `env` and
the `LMGATE_*` variables a worker uses to register: `LMGATE_REGISTER_URL`,
`LMGATE_TELEMETRY_URL`, `LMGATE_INSTANCE_ID`, `LMGATE_REGISTER_SECRET`, `LMGATE_PORT`).
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from lmgate.backends.config import LocalBackendConfig, SlurmBackendConfig
from lmgate.backends.launchers.base import JobSpec
from lmgate.backends.launchers.slurm import sbatch_options

DEFAULT_TEMPLATE = """#!/bin/bash
# lmgate worker for {{ model }} (instance {{ instance_id }})
{{ exports }}
{{ command }}
"""
REGISTER_PATH = "/internal/backends/register"
TELEMETRY_PATH = "/internal/backends/telemetry"

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@dataclass(frozen=True)
class Launch:
    """What is known about a worker before it is submitted."""

    model: str
    instance_id: str
    port: int
    secret: str
    gateway_url: str


def build_job(
    config: SlurmBackendConfig | LocalBackendConfig, launch: Launch, base_dir: Path
) -> JobSpec:
    """The job that starts one worker for `launch.model`."""
    context = _context(config, launch)
    lmgate_env = {
        "LMGATE_REGISTER_URL": context["register_url"],
        "LMGATE_TELEMETRY_URL": context["telemetry_url"],
        "LMGATE_INSTANCE_ID": launch.instance_id,
        "LMGATE_REGISTER_SECRET": launch.secret,
        "LMGATE_PORT": str(launch.port),
    }
    env = {**config.env, **lmgate_env}
    context["exports"] = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    context["command"] = render(config.command or "", context) if config.command else ""
    if isinstance(config, LocalBackendConfig):
        script = render(DEFAULT_TEMPLATE, context)
        return JobSpec(name=f"lmgate-{launch.model}", script=script, env=env)
    source = config.script_source(base_dir) or DEFAULT_TEMPLATE
    options = sbatch_options(
        partition=config.partition,
        account=config.account,
        qos=config.qos,
        walltime=config.walltime,
        cpus=config.cpus,
        gpus=config.gpus,
        memory=config.memory,
        output=config.output,
        extra=config.sbatch_args,
    )
    name = render(config.job_name, context)
    return JobSpec(name=name, script=render(source, context), env=env, options=options)


def render(template: str, context: dict[str, Any]) -> str:
    """Render a Jinja2 template; an unknown variable is an error, not an empty string."""
    try:
        return _ENV.from_string(template).render(context)
    except jinja2.TemplateError as e:
        raise ValueError(f"job template: {e}") from e


def _context(config: SlurmBackendConfig | LocalBackendConfig, launch: Launch) -> dict[str, Any]:
    slurm = config if isinstance(config, SlurmBackendConfig) else None
    return {
        "model": launch.model,
        "upstream_model": config.upstream_model or launch.model,
        "model_path": config.model_path or launch.model,
        "host": config.host,
        "port": launch.port,
        "instance_id": launch.instance_id,
        "register_url": launch.gateway_url + REGISTER_PATH,
        "telemetry_url": launch.gateway_url + TELEMETRY_PATH,
        "gpus": slurm.gpus if slurm else 0,
        "cpus": slurm.cpus if slurm else 1,
        "memory": slurm.memory if slurm else None,
        "partition": slurm.partition if slurm else None,
        "account": slurm.account if slurm else None,
        "qos": slurm.qos if slurm else None,
        "walltime": slurm.walltime if slurm else None,
        "env": dict(config.env),
        "python": sys.executable,
    }
