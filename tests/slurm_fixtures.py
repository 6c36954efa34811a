"""Fixtures for managed-backend tests: a real single-node SLURM, a private sshd on loopback,
a tiny server for the workers' internal endpoints, and a manager factory.

SLURM is started once per session with `../shared/slurm/start-single-node.sh --accounting`
(idempotent; `SLURM_NODE_CPUS=8` so that several one-CPU workers run at once). When it cannot
start, the tests skip, or fail when CI=true.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lmgate.backends.config import BackendsSettings, SshConfig
from lmgate.backends.manager import BackendManager
from lmgate.routing.deployment import Deployment
from lmgate.storage.db import Database
from lmgate.upstream.provider import Provider, ProviderConfig

ROOT = Path(__file__).resolve().parents[1]
START = ROOT.parent / "shared" / "slurm" / "start-single-node.sh"
STUB = f"{sys.executable} -m lmgate.testing.stub"
JOB_PREFIX = "lmgtest"


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture() -> Iterator[None]:
    """A running single-node SLURM with accounting; test jobs are cancelled at the end."""
    if os.geteuid() != 0 or not START.exists():
        _unavailable(f"SLURM needs root and {START}")
    env = {**os.environ, "SLURM_NODE_CPUS": os.environ.get("SLURM_NODE_CPUS", "8")}
    proc = subprocess.run(
        ["bash", str(START), "--accounting"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0 or "SLURM READY" not in proc.stdout:
        _unavailable(f"SLURM did not start: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    yield
    names = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True)
    ours = [ln.split()[0] for ln in names.stdout.splitlines() if JOB_PREFIX in ln]
    if ours:
        subprocess.run(["scancel", *ours], check=False)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sshd:
    """A private sshd on 127.0.0.1 that accepts one client key."""

    port: int
    client_key: Path
    known_hosts: Path

    def config(self, **overrides: Any) -> SshConfig:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "root",
            "key_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            **overrides,
        }
        return SshConfig(**values)


@pytest.fixture(scope="session", name="sshd")
def sshd_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """The README's loopback sshd recipe, on a free port, with a known_hosts file."""
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keygen"):
        _unavailable("sshd is not installed (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("hostkey", "clientkey"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "clientkey.pub", d / "authorized_keys")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    (d / "sshd_config").write_text(
        "\n".join(
            [
                "ListenAddress 127.0.0.1",
                f"Port {port}",
                f"HostKey {d / 'hostkey'}",
                f"PidFile {d / 'sshd.pid'}",
                f"AuthorizedKeysFile {d / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "",
            ]
        )
    )
    subprocess.run(
        ["/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True
    )
    host_key = (d / "hostkey.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    wait_for(lambda: _listening(port), 10, "sshd")
    yield Sshd(port, d / "clientkey", d / "known_hosts")
    pid = (d / "sshd.pid").read_text().strip()
    subprocess.run(["kill", pid], check=False)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class InternalServer:
    """Serves the workers' internal endpoints for a manager, as the gateway will."""

    runner: web.AppRunner
    url: str
    manager: BackendManager | None = None
    registrations: list[dict[str, Any]] = field(default_factory=list)


async def start_internal_server() -> InternalServer:
    """`POST /internal/backends/{register,telemetry}` on a free port."""
    server: InternalServer

    async def handle(request: web.Request) -> web.Response:
        payload = await request.json()
        secret = request.headers.get("Authorization", "").removeprefix("Bearer ")
        assert server.manager is not None
        if request.path.endswith("/register"):
            server.registrations.append({**payload, "at": time.time()})
            status, body = await server.manager.handle_register(payload, secret)
        else:
            status, body = await server.manager.handle_telemetry(payload, secret)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/internal/backends/register", handle)
    app.router.add_post("/internal/backends/telemetry", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server = InternalServer(runner, f"http://127.0.0.1:{port}")
    return server


_names = itertools.count(1)


def make_deployment(base_url: str, upstream_model: str) -> Deployment:
    """The factory the gateway passes to the manager, minus the gateway."""
    return Deployment(
        Provider(f"worker{next(_names)}", ProviderConfig(base_url=base_url)), upstream_model
    )


FAST = BackendsSettings(
    poll_interval=1.0, fast_poll_interval=0.2, tick_interval=0.1, follower_refresh=0.5
)


@pytest.fixture(name="internal")
async def internal_fixture() -> AsyncIterator[InternalServer]:
    """An internal-endpoint server; set `.manager` before workers register."""
    server = await start_internal_server()
    yield server
    await server.runner.cleanup()


async def new_manager(
    models: dict[str, Any], db: Database, internal: InternalServer, **settings: Any
) -> BackendManager:
    """A started manager whose workers register with `internal`."""
    from pydantic import TypeAdapter

    from lmgate.backends.config import BackendConfig

    adapter: TypeAdapter[Any] = TypeAdapter(BackendConfig)
    configs = {name: adapter.validate_python(cfg) for name, cfg in models.items()}
    s = FAST.model_copy(update={"public_url": internal.url, **settings})
    manager = BackendManager(configs, s, db, make_deployment)
    internal.manager = manager
    await manager.start()
    return manager
