"""Active health checks against real stub upstreams: out of rotation and back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from lmgate.config.schema import ProviderConfig
from lmgate.routing.deployment import Deployment
from lmgate.routing.health import HealthChecker
from lmgate.testing.stub import RunningStub, StubOptions, start_stub
from lmgate.upstream.provider import Provider

Events = list[tuple[str, bool]]


@pytest.fixture
async def stubs() -> AsyncIterator[list[RunningStub]]:
    running = [await start_stub(StubOptions(name=f"s{i}")) for i in range(2)]
    yield running
    for stub in running:
        await stub.close()


@pytest.fixture
async def providers() -> AsyncIterator[list[Provider]]:
    made: list[Provider] = []
    yield made
    for p in made:
        await p.close()


def provider(made: list[Provider], name: str, url: str, **config: Any) -> Provider:
    p = Provider(name, ProviderConfig(base_url=url, **config))
    made.append(p)
    return p


async def configure(stub: RunningStub, **changes: Any) -> None:
    async with httpx.AsyncClient() as client:
        url = stub.url.removesuffix("/v1") + "/_stub/config"
        (await client.post(url, json=changes)).raise_for_status()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def recorder(events: Events) -> Callable[[Deployment, bool], None]:
    return lambda dep, healthy: events.append((dep.label, healthy))


def healthy(dep: Deployment) -> bool:
    return bool(getattr(dep, "healthy", True))


async def test_failing_deployment_leaves_and_returns(
    stubs: list[RunningStub], providers: list[Provider]
) -> None:
    a = Deployment(provider(providers, "a", stubs[0].url), "m1")
    b = Deployment(provider(providers, "b", stubs[1].url), "m1")
    events: Events = []
    checker = HealthChecker([a, b], interval=0.05, on_change=recorder(events))
    await checker.start()
    try:
        assert events == [("a/m1", True), ("b/m1", True)]
        await asyncio.sleep(0.2)
        assert healthy(a) and healthy(b)
        await configure(stubs[0], fail_status=503)  # /v1/models answers 503 now
        await until(lambda: not healthy(a))
        assert healthy(b)
        assert events[2:] == [("a/m1", False)]
        await configure(stubs[0], fail_status=None)
        await until(lambda: healthy(a))
        assert events[2:] == [("a/m1", False), ("a/m1", True)]
        assert healthy(b)
    finally:
        await checker.close()


async def test_thresholds(stubs: list[RunningStub], providers: list[Provider]) -> None:
    dep = Deployment(provider(providers, "a", stubs[0].url), "m1")
    checker = HealthChecker([dep], interval=3600, unhealthy_after=2, healthy_after=2)
    await configure(stubs[0], fail_status=500)
    await checker.check()
    assert healthy(dep)  # one failure is not enough
    await checker.check()
    assert not healthy(dep)
    await configure(stubs[0], fail_status=None)
    await checker.check()
    assert not healthy(dep)  # one pass is not enough either
    await configure(stubs[0], fail_status=500)
    await checker.check()
    await configure(stubs[0], fail_status=None)
    await checker.check()
    assert not healthy(dep)  # the streak of passes was broken
    await checker.check()
    assert healthy(dep)


async def test_one_probe_per_provider(stubs: list[RunningStub], providers: list[Provider]) -> None:
    shared = provider(providers, "a", stubs[0].url)
    deps = [Deployment(shared, "m1"), Deployment(shared, "m2"), Deployment(shared, None)]
    events: Events = []
    checker = HealthChecker([*deps, deps[0]], interval=3600, unhealthy_after=1)
    checker.on_change = recorder(events)
    assert len(checker.targets) == 1 and len(checker.targets[0].deployments) == 3
    await configure(stubs[0], fail_status=503)
    await checker.check()
    assert not any(healthy(d) for d in deps)
    assert events == [("a/m1", False), ("a/m2", False), ("a/*", False)]


async def test_unreachable_and_slow_providers(
    stubs: list[RunningStub], providers: list[Provider]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    gone = Deployment(provider(providers, "gone", f"http://127.0.0.1:{closed_port}/v1"), "m")
    slow = Deployment(provider(providers, "slow", stubs[0].url), "m")
    fine = Deployment(provider(providers, "fine", stubs[1].url), "m")
    await configure(stubs[0], delay=2.0)
    checker = HealthChecker([gone, slow, fine], interval=3600, timeout=0.2, unhealthy_after=1)
    started = asyncio.get_running_loop().time()
    await checker.check()
    assert asyncio.get_running_loop().time() - started < 1.5  # probes run concurrently
    assert not healthy(gone) and not healthy(slow) and healthy(fine)


async def test_probe_path_and_credentials(providers: list[Provider]) -> None:
    stub = await start_stub(StubOptions(api_key="sk-upstream-secret-123456789"))
    try:
        good = Deployment(
            provider(providers, "good", stub.url, api_key="sk-upstream-secret-123456789"), "m"
        )
        bad = Deployment(provider(providers, "bad", stub.url, api_key="wrong"), "m")
        checker = HealthChecker([good, bad], interval=3600, unhealthy_after=1)
        await checker.check()
        assert healthy(good) and not healthy(bad)  # 401 is a failure
        checker = HealthChecker([good], interval=3600, path="/no-such-path", unhealthy_after=1)
        await checker.check()
        assert not healthy(good)
    finally:
        await stub.close()


async def test_close_stops_the_rounds(stubs: list[RunningStub], providers: list[Provider]) -> None:
    dep = Deployment(provider(providers, "a", stubs[0].url), "m1")
    checker = HealthChecker([dep], interval=0.02, unhealthy_after=1)
    await checker.start()
    await checker.close()
    await checker.close()  # twice is fine
    await configure(stubs[0], fail_status=503)
    await asyncio.sleep(0.1)
    assert healthy(dep)
