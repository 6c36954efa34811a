"""`lmgate serve`: run the gateway on a configuration file or on the embedded defaults."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from lmgate.config.defaults import DEMO_MODEL, embedded_config, ollama_answers
from lmgate.config.loader import ConfigError, load_config
from lmgate.config.schema import GatewayConfig
from lmgate.observability import (
    cleanup_multiprocess_dir,
    configure_logging,
    prepare_multiprocess_dir,
)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML configuration file.", exists=False)
]


def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug, info, warning, error (default: observability.log_level)."),
    ] = None,
) -> None:
    """Run the gateway. Without --config: embedded defaults and a local demo model."""
    logging.basicConfig(level=(log_level or "info").upper(), format="%(message)s")
    path = config if config is not None else _write_embedded()
    cfg = load_or_exit(path)
    log_level = log_level or cfg.observability.log_level
    configure_logging(log_level, cfg.observability.log_format == "json")
    server = cfg.server
    host = host or server.host
    port = server.port if port is None else port
    workers = workers or server.workers
    server.host, server.port = host, port  # managed workers register at this address
    common = {
        "host": host,
        "port": port,
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": server.access_log,
        "log_level": log_level,
        "timeout_graceful_shutdown": 30,
        "proxy_headers": False,
        "server_header": False,
    }
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit normally then, so that
    # atexit clean-up (the demo worker, the embedded config) runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    typer.echo(f"lmgate listening on http://{host}:{port}/v1 ({workers} worker(s))", err=True)
    if workers == 1:
        from lmgate.api.app import Gateway

        uvicorn.run(Gateway(cfg), **common)  # type: ignore[arg-type]
    else:
        # Every worker writes its metrics where any of them can sum them for a scrape.
        atexit.register(cleanup_multiprocess_dir, prepare_multiprocess_dir())
        os.environ["LMGATE_CONFIG"] = str(path)
        os.environ["LMGATE_LISTEN"] = f"{host}:{port}"
        uvicorn.run("lmgate.api.app:create_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]


def load_or_exit(path: Path) -> GatewayConfig:
    """Load a configuration, or print its problems and exit with status 2."""
    try:
        return load_config(path)
    except ConfigError as e:
        typer.echo(f"configuration error:\n{e}", err=True)
        raise typer.Exit(2) from None


def _write_embedded() -> Path:
    """Start the demo worker and write the embedded configuration to a private file."""
    tmp = Path(tempfile.mkdtemp(prefix="lmgate-"))
    atexit.register(shutil.rmtree, tmp, True)
    demo_url = _start_demo(tmp / "demo.addr")
    text = embedded_config(os.environ, demo_url, ollama_answers())
    path = tmp / "lmgate.yaml"
    path.write_text(text)
    path.chmod(0o600)
    typer.echo(f"no --config: using the embedded defaults ({path})", err=True)
    return path


def _start_demo(addr_file: Path, wait: float = 15.0) -> str | None:
    """Run the stub worker that serves the demo model; its base URL, or None if it fails."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmgate.testing.stub",
            "--port",
            "0",
            "--port-file",
            str(addr_file),
            "--name",
            DEMO_MODEL,
            "--models",
            DEMO_MODEL,
            "--chunk-delay",
            "0.02",
        ],
        stdout=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    atexit.register(proc.terminate)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and proc.poll() is None:
        if addr_file.exists():
            return f"http://{addr_file.read_text().strip()}/v1"
        time.sleep(0.05)
    typer.echo("warning: the demo model's worker did not start", err=True)
    return None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the gateway dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
