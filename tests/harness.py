"""Real servers for tests: stubs and gateways on real sockets, in a background event loop.

The tests' clients (the sync and async `openai` SDK, LangChain, httpx) talk to them over
loopback HTTP exactly as a user's would; the servers run in their own thread so that a
blocking client never stalls them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
import yaml

from lmgate.api.app import Gateway
from lmgate.config.loader import parse_config
from lmgate.testing.stub import RunningStub, StubOptions, start_stub

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` in the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@dataclass
class RunningGateway:
    """A gateway serving on a real socket."""

    gateway: Gateway
    server: uvicorn.Server
    task: asyncio.Future[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


async def start_gateway(
    config: dict[str, Any] | str, env: dict[str, str] | None = None
) -> RunningGateway:
    """Validate `config` (a dict or YAML text) and serve it on a free port."""
    if isinstance(config, dict):
        # Tests of routing and relaying run without keys or a ledger unless they ask.
        config = {
            "auth": {"enabled": False},
            "accounting": {"enabled": False},
            **config,
        }
    text = config if isinstance(config, str) else yaml.safe_dump(config)
    gateway = Gateway(parse_config(text, env=env or {}))
    server = uvicorn.Server(
        uvicorn.Config(
            gateway,
            host="127.0.0.1",
            port=0,
            loop="none",
            http="httptools",
            lifespan="on",
            log_level="warning",
            access_log=False,
        )
    )
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("gateway did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningGateway(gateway, server, task, port)


async def stop_gateway(gw: RunningGateway) -> None:
    gw.server.should_exit = True
    await asyncio.wait_for(gw.task, 10)


class Servers:
    """Starts stubs and gateways in a LoopThread and stops them all at the end of a test."""

    def __init__(self, thread: LoopThread) -> None:
        self.thread = thread
        self._stubs: list[RunningStub] = []
        self._gateways: list[RunningGateway] = []

    def stub(self, **options: Any) -> RunningStub:
        stub = self.thread.run(start_stub(StubOptions(**options)))
        self._stubs.append(stub)
        return stub

    def gateway(
        self, config: dict[str, Any] | str, env: dict[str, str] | None = None
    ) -> RunningGateway:
        gw = self.thread.run(start_gateway(config, env))
        self._gateways.append(gw)
        return gw

    def close(self) -> None:
        for gw in self._gateways:
            self.thread.run(stop_gateway(gw))
        for stub in self._stubs:
            self.thread.run(stub.close())


def one_model(
    stub_url: str, name: str = "m1", upstream: str | None = None, **provider: Any
) -> dict[str, Any]:
    """A configuration with one provider `up` at `stub_url` and one model on it."""
    model: dict[str, Any] = {"name": name, "provider": "up"}
    if upstream:
        model["model"] = upstream
    return {
        "providers": {"up": {"base_url": stub_url, "api_key": "sk-upstream-secret", **provider}},
        "models": [model],
    }
