"""Managed backends through the whole gateway, with the official openai SDK as the client.

!!! THESE TESTS NEED THE LEAD'S INTEGRATION and fail until it lands: !!!
- `ModelConfig.backend: BackendConfig | None` and `GatewayConfig.backends: BackendsSettings`;
- the gateway builds a `BackendManager` at start-up (after the database) and, for a managed
  model, routes to `manager.deployments(model)`; with none ready, `manager.on_request(model)`
  gives a `ColdModel` that becomes a 503 `model_not_ready` (or `model_failed`) in OpenAI's
  envelope with `Retry-After`, or a wait of up to `cold_wait` through `manager.wait_ready`;
- `POST /internal/backends/register` and `/internal/backends/telemetry` call
  `manager.handle_register/handle_telemetry(payload, bearer_secret)`;
- `/v1/models` adds `"lmgate_backend": manager.model_states()[name]` to managed models;
- `lmgate backends` is registered in `lmgate/cli/__init__.py`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
import yaml
from typer.testing import CliRunner

from lmgate.api.app import Gateway
from lmgate.config.loader import parse_config
from tests.harness import LoopThread
from tests.slurm_fixtures import JOB_PREFIX, free_port, slurm_fixture  # noqa: F401
from tests.test_backends_manager import WORKER

pytestmark = pytest.mark.usefixtures("slurm")


class Served:
    """A gateway on a known port (workers need its URL before it starts)."""

    def __init__(self, thread: LoopThread, config: dict[str, Any], tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "auth": {"enabled": False},
            "accounting": {"enabled": False},
            "database": {"url": f"sqlite+aiosqlite:///{tmp}/lmgate.db"},
            "server": {"port": self.port},
            "backends": {"public_url": self.url, "poll_interval": 1.0,
                         "fast_poll_interval": 0.2, "tick_interval": 0.1},
            **config,
        }  # fmt: skip
        self.config_path = tmp / "lmgate.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.thread = thread
        self.gateway = Gateway(parse_config(yaml.safe_dump(config), env={}))
        self.server = uvicorn.Server(
            uvicorn.Config(self.gateway, host="127.0.0.1", port=self.port, loop="none",
                           lifespan="on", log_level="warning")
        )  # fmt: skip
        self.task = thread.run(self._start())

    async def _start(self) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        return task

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.run(asyncio.wait_for(self.task, 30), timeout=40)


@pytest.fixture
def serve(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Any]:
    served: list[Served] = []

    def start(models: list[dict[str, Any]]) -> Served:
        s = Served(loop_thread, {"models": models}, tmp_path)
        served.append(s)
        return s

    yield start
    for s in served:
        manager = s.gateway.services.backends
        for pool in manager.pools.values():
            loop_thread.run(pool.stop_now())
        s.stop()


def managed(name: str = "m", **backend: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": {"type": "slurm", "command": WORKER, "job_name": JOB_PREFIX + "-{{ model }}",
                    "output": "/dev/null", "walltime": "30", "health_interval": 0.5, **backend},
    }  # fmt: skip


def recording_client(base_url: str, seen: list[httpx.Response], **kw: Any) -> openai.OpenAI:
    """The stock SDK; an httpx hook only records the answers it gets (no retry code)."""
    hook = {"response": [seen.append]}
    return openai.OpenAI(base_url=base_url, api_key="sk-none",
                         http_client=httpx.Client(event_hooks=hook), **kw)  # fmt: skip


def ask(client: openai.OpenAI, model: str = "m", **extra: Any) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], extra_body=extra or None
    )
    return reply.choices[0].message.content or ""


def test_cold_start_503_with_retry_after_then_the_sdk_retries_succeed(serve: Any) -> None:
    gw = serve([managed()])
    seen: list[httpx.Response] = []
    started = time.monotonic()
    assert "stub worker" in ask(recording_client(f"{gw.url}/v1", seen))
    first = seen[0]
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "model_not_ready"
    assert "starting" in first.json()["error"]["message"]
    assert 1 <= int(first.headers["retry-after"]) <= 60
    assert seen[-1].status_code == 200
    print(f"\ncold start through the SDK: {time.monotonic() - started:.2f} s")


def test_v1_models_shows_managed_states(serve: Any) -> None:
    gw = serve([managed(), managed("bad", qos="no-such-qos")])
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-none", max_retries=0)
    states = {m.id: m.model_extra["lmgate_backend"]["state"] for m in client.models.list()}
    assert states == {"m": "cold", "bad": "cold"}
    with pytest.raises(openai.APIStatusError):
        ask(client, "bad")
    time.sleep(2)
    listing = {m.id: m.model_extra["lmgate_backend"] for m in client.models.list()}
    assert listing["bad"]["state"] == "failed"
    assert "Invalid qos specification" in listing["bad"]["reason"]
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, "bad")
    assert info.value.status_code == 503 and "Invalid qos" in info.value.message


def test_cold_wait_holds_the_first_request(serve: Any) -> None:
    gw = serve([managed(cold_wait=30)])
    seen: list[httpx.Response] = []
    started = time.monotonic()
    assert "stub worker" in ask(recording_client(f"{gw.url}/v1", seen, max_retries=0))
    print(f"\ncold start held by the gateway: {time.monotonic() - started:.2f} s")
    assert [r.status_code for r in seen] == [200]


def test_scales_up_under_sdk_load_and_down_to_zero(serve: Any) -> None:
    gw = serve([managed(max_instances=3, target_inflight_per_instance=1, idle_timeout=3,
                        scale_window=1, cold_wait=30)])  # fmt: skip
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-none")
    manager = gw.gateway.services.backends
    peak = 0
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(ask, client, "m", stub={"delay": 0.5}) for _ in range(360)]
        while not all(f.done() for f in futures):
            peak = max(peak, len(manager.deployments("m")))
            time.sleep(0.1)
        assert all("stub worker" in f.result() for f in futures)
    assert peak == 3
    deadline = time.monotonic() + 60
    while manager.model_states()["m"]["instances"]:
        assert time.monotonic() < deadline, "no scale-down to zero"
        time.sleep(0.2)


def test_register_refuses_a_wrong_secret(serve: Any) -> None:
    gw = serve([managed()])
    r = httpx.post(f"{gw.url}/internal/backends/register",
                   json={"instance": "x", "host": "h", "port": 1},
                   headers={"Authorization": "Bearer sk-user-key"})  # fmt: skip
    assert r.status_code == 401


def test_cli_table_start_and_stop(serve: Any) -> None:
    from lmgate.cli import app

    gw = serve([managed()])
    runner = CliRunner()
    cfg = str(gw.config_path)
    assert runner.invoke(app, ["backends", "start", "m", "-c", cfg]).exit_code == 0
    deadline = time.monotonic() + 30
    while not gw.gateway.services.backends.deployments("m"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.5)
    table = runner.invoke(app, ["backends", "-c", cfg], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "ready" in table.output and "m" in table.output
    assert runner.invoke(app, ["backends", "stop", "m", "-c", cfg]).exit_code == 0
    while gw.gateway.services.backends.model_states()["m"]["instances"]:
        assert time.monotonic() < deadline + 30
        time.sleep(0.2)
    assert runner.invoke(app, ["backends", "stop", "nope", "-c", cfg]).exit_code == 1
