"""How each gateway under test is installed, configured and started."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from loadgen import CommandLog
from proctree import Service, free_port, spawn, stop, wait_http
from upstreams import litellm_conf, lmgate_conf

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".venv-litellm"


@dataclass(frozen=True)
class Gateway:
    """A gateway under test: its command template, readiness path and environment.

    The template may use {python}, {host}, {port}, {config} and {workers}.
    """

    name: str
    label: str
    template: str
    health_path: str
    config_kind: str
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 60.0


@dataclass
class Running:
    """A started gateway and the URL it serves on."""

    service: Service
    url: str
    config: Path


def default_lmgate_template() -> str:
    """`lmgate serve ...` via the console script if installed, else via its entry function."""
    script = Path(sys.executable).with_name("lmgate")
    tail = "serve --config {config} --host {host} --port {port} --workers {workers}"
    if script.exists():
        return f"{shlex.quote(str(script))} {tail}"
    entry = "import sys; from lmgate.cli import main; sys.argv[0] = 'lmgate'; sys.exit(main())"
    return f"{{python}} -c {shlex.quote(entry)} {tail}"


def lmgate(template: str | None) -> Gateway:
    """The gateway of this repository (or a stand-in given with --gateway-cmd)."""
    return Gateway(
        name="lmgate",
        label="lmgate",
        template=template or default_lmgate_template(),
        health_path="/health",
        config_kind="lmgate",
    )


def litellm(version: str, api_key: str) -> Gateway:
    """LiteLLM's proxy from its own venv, one worker, no database, `api_key` as master key."""
    exe = LITELLM_VENV / "bin" / "litellm"
    return Gateway(
        name="litellm",
        label=f"LiteLLM {version}",
        template=f"{shlex.quote(str(exe))} --config {{config}} --host {{host}} --port {{port}} "
        "--num_workers {workers}",
        health_path="/health/liveliness",
        config_kind="litellm",
        env={
            "LITELLM_MASTER_KEY": api_key,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_LOG": "ERROR",
            "DISABLE_ADMIN_UI": "True",
            "LITELLM_TELEMETRY": "False",
        },
        startup_timeout=180.0,
    )


def ensure_litellm(version: str, log: CommandLog) -> None:
    """Create bench/.venv-litellm with litellm[proxy]==version unless already there."""
    marker = LITELLM_VENV / f".installed-{version}"
    if marker.exists():
        return
    pip = LITELLM_VENV / "bin" / "pip"
    if not pip.exists():
        _run_logged(log, [sys.executable, "-m", "venv", str(LITELLM_VENV)])
    for old in LITELLM_VENV.glob(".installed-*"):
        old.unlink()
    _run_logged(log, [str(pip), "install", "-q", f"litellm[proxy]=={version}"])
    marker.touch()


def _run_logged(log: CommandLog, cmd: list[str]) -> None:
    log.add(cmd)
    print(f"# {shlex.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True)


def write_config(gw: Gateway, tmp: Path, port: int, nginx_port: int, stub_port: int) -> Path:
    """The config file the gateway is started with."""
    if gw.config_kind == "litellm":
        return litellm_conf(tmp, nginx_port, stub_port)
    return lmgate_conf(tmp, port, nginx_port, stub_port)


def start(
    gw: Gateway,
    tmp: Path,
    log: CommandLog,
    *,
    workers: int,
    cpus: str,
    nginx_port: int,
    stub_port: int,
) -> Running:
    """Start the gateway pinned to `cpus` and wait until its health check answers 200."""
    port = free_port()
    config = write_config(gw, tmp, port, nginx_port, stub_port)
    fields = {
        "python": shlex.quote(sys.executable),
        "host": "127.0.0.1",
        "port": str(port),
        "config": shlex.quote(str(config)),
        "workers": str(workers),
    }
    cmd = shlex.split(gw.template.format(**fields))
    service = spawn(
        f"{gw.name}-w{workers}", cmd, cpus, tmp, env={**os.environ, **gw.env}, cwd=REPO_DIR
    )
    log.add(service.cmd, gw.env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(service, url + gw.health_path, gw.startup_timeout)
    except BaseException:
        stop(service)
        raise
    return Running(service, url, config)
