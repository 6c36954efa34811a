"""How each gateway under test is installed, configured and started."""

from __future__ import annotations

import contextlib
import os
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadgen import CommandLog
from proctree import Service, free_port, spawn, stop, wait_http
from upstreams import accounting_db, litellm_conf, lmgate_conf

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
BENCH_USER = "bench"
BENCH_BUDGET = "1000000"


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
    """A started gateway, the URL it serves on, and the key clients must send (if any)."""

    service: Service
    url: str
    config: Path
    api_key: str | None = None
    database: Path | None = None


def lmgate_cli() -> list[str]:
    """The `lmgate` command: the console script if installed, else its entry function."""
    script = Path(sys.executable).with_name("lmgate")
    if script.exists():
        return [str(script)]
    entry = "import sys; from lmgate.cli import main; sys.argv[0] = 'lmgate'; sys.exit(main())"
    return [sys.executable, "-c", entry]


def default_lmgate_template() -> str:
    """`lmgate serve ...` via the console script if installed, else via its entry function."""
    tail = "serve --config {config} --host {host} --port {port} --workers {workers}"
    cli = lmgate_cli()
    if len(cli) == 1:
        return f"{shlex.quote(cli[0])} {tail}"
    return f"{{python}} -c {shlex.quote(cli[2])} {tail}"


def lmgate(template: str | None) -> Gateway:
    """The gateway of this repository (or a stand-in given with --gateway-cmd)."""
    return Gateway(
        name="lmgate",
        label="lmgate",
        template=template or default_lmgate_template(),
        health_path="/health",
        config_kind="lmgate",
    )


def lmgate_accounting(template: str | None) -> Gateway:
    """lmgate with keys, a budget and the ledger on (a user and key made with the CLI)."""
    return Gateway(
        name="lmgate-acct",
        label="lmgate + keys, budget, ledger",
        template=template or default_lmgate_template(),
        health_path="/health",
        config_kind="lmgate-accounting",
    )


def lmgate_limits(template: str | None, redis_url: str | None) -> Gateway:
    """lmgate with RPM, TPM and in-flight limits on every model: in process, or in Redis."""
    where = "redis" if redis_url else "local"
    return Gateway(
        name=f"lmgate-limits-{where}",
        label=f"lmgate + limits in {'Redis' if redis_url else 'process'}",
        template=template or default_lmgate_template(),
        health_path="/health",
        config_kind="lmgate-limits",
        env={"BENCH_LIMITS": redis_url or "local"},
    )


def provision_key(config: Path, log: CommandLog) -> str:
    """Create the user `bench` and a key with a budget, with the CLI; return the key."""
    cli = [*lmgate_cli()]
    _run_logged(log, [*cli, "users", "add", BENCH_USER, "--config", str(config)], quiet=True)
    create = [
        *cli, "keys", "create", "--user", BENCH_USER,
        "--budget", BENCH_BUDGET, "--period", "month", "--config", str(config),
    ]  # fmt: skip
    out = _run_logged(log, create, quiet=True)
    keys = [line for line in out.splitlines() if line.startswith("lmg-")]
    if len(keys) != 1:
        raise RuntimeError(f"`lmgate keys create` printed no key:\n{out}")
    return keys[0]


def read_ledger(db: Path) -> dict[str, Any]:
    """What the ledger holds after the gateway stopped: rows, statuses, cost."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows, ok, cost, estimated = conn.execute(
            "SELECT count(*), sum(status = 200), coalesce(sum(cost), 0), sum(estimated) "
            "FROM usage_records"
        ).fetchone()
        statuses = dict(
            conn.execute("SELECT status, count(*) FROM usage_records GROUP BY status").fetchall()
        )
    return {
        "rows": rows,
        "status_200": ok or 0,
        "statuses": {str(k): v for k, v in statuses.items()},
        "cost_usd": cost,
        "estimated": estimated or 0,
    }


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


def _run_logged(log: CommandLog, cmd: list[str], quiet: bool = False) -> str:
    log.add(cmd)
    if not quiet:
        print(f"# {shlex.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(cmd, check=False, capture_output=quiet, text=True, cwd=REPO_DIR)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr or ''}")
    return proc.stdout or ""


def write_config(gw: Gateway, tmp: Path, port: int, nginx_port: int, stub_port: int) -> Path:
    """The config file the gateway is started with."""
    if gw.config_kind == "litellm":
        return litellm_conf(tmp, nginx_port, stub_port)
    accounting = gw.config_kind == "lmgate-accounting"
    limits = gw.env.get("BENCH_LIMITS") if gw.config_kind == "lmgate-limits" else None
    return lmgate_conf(tmp, port, nginx_port, stub_port, accounting=accounting, limits_redis=limits)


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
    api_key = database = None
    if gw.config_kind == "lmgate-accounting":
        api_key = provision_key(config, log)
        database = accounting_db(tmp, port)
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
    return Running(service, url, config, api_key, database)
