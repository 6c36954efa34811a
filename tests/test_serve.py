"""`lmgate serve` as a user runs it: a real process, on embedded defaults or a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.harness import Servers, one_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "lmgate", "serve", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(port: int, proc: subprocess.Popen[bytes], limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read().decode() if proc.stdout else "exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the gateway did not become ready")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


def test_embedded_defaults_first_call(processes: list, tmp_path: Path) -> None:
    """No file, no account: the demo model answers the stock SDK, streaming too."""
    port = free_port()
    env = {"OPENAI_API_KEY": "", "MISTRAL_API_KEY": ""}
    proc = serve("--port", str(port), env=env, cwd=tmp_path)
    processes.append(proc)
    start = time.monotonic()
    wait_ready(port, proc)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["lmgate-demo"]
    reply = client.chat.completions.create(
        model="lmgate-demo", messages=[{"role": "user", "content": "hello"}]
    )
    assert reply.choices[0].message.content.endswith("hello")
    chunks = list(
        client.chat.completions.create(
            model="lmgate-demo", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks and time.monotonic() - start < 60
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    out = proc.stdout.read().decode()
    demo_pids = subprocess.run(
        ["pgrep", "-f", f"lmgate.testing.stub.*{port}"], capture_output=True, text=True
    )
    assert demo_pids.stdout.strip() == "", out  # the demo worker went with the gateway
    assert (tmp_path / "lmgate.db").exists()  # the ledger of the first run


def test_workers_share_the_port(servers: Servers, tmp_path: Path, processes: list) -> None:
    stub = servers.stub()
    config = tmp_path / "lmgate.yaml"
    no_db = {"auth": {"enabled": False}, "accounting": {"enabled": False}}
    config.write_text(yaml.safe_dump({**one_model(stub.url), **no_db}))
    port = free_port()
    proc = serve("--config", str(config), "--port", str(port), "--workers", "2")
    processes.append(proc)
    wait_ready(port, proc)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    for _ in range(10):
        client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "x"}])
    assert stub.stats.requests == 10
    pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert len(pids.stdout.split()) >= 2  # two worker processes under the supervisor


def test_bad_config_exits_2_naming_the_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("providers:\n  up:\n    base_url: ftp://x\nmodels: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lmgate", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{config}:3: providers.up.base_url" in proc.stderr
