"""Routing by name, alias and wildcard; balancing; retries on other deployments; cool-down;
per-request timeouts."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.harness import Servers

MSG = [{"role": "user", "content": "hi"}]


def two_deployments(a_url: str, b_url: str, **routing: object) -> dict:
    return {
        "providers": {"a": {"base_url": a_url}, "b": {"base_url": b_url}},
        "models": [{"name": "m", "deployments": [{"provider": "a"}, {"provider": "b"}]}],
        "routing": routing,
    }


def chat(url: str, **extra: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MSG, **extra})


def test_alias_pattern_and_provider_wildcard(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(
        {
            "providers": {
                "up": {"base_url": stub.url},
                "closed": {"base_url": stub.url, "wildcard": False},
            },
            "models": [
                {"name": "big", "aliases": ["large"], "provider": "up", "model": "real-big"},
                {"name": "llama-*", "provider": "up"},
            ],
        }
    )
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    for asked, sent in [
        ("big", "real-big"),
        ("large", "real-big"),
        ("llama-3-8b", "llama-3-8b"),
        ("up/some-model", "some-model"),
    ]:
        client.chat.completions.create(model=asked, messages=MSG)
        assert stub.stats.last_request["body"]["model"] == sent
    for missing in ["closed/x", "nope/x", "up/", "mistral-7b"]:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=missing, messages=MSG)
    assert [m.id for m in client.models.list().data] == ["big"]


def test_retry_on_next_deployment_after_5xx_and_429(servers: Servers) -> None:
    bad = servers.stub(fail_status=503)
    good = servers.stub()
    url = servers.gateway(two_deployments(bad.url, good.url, cooldown=0)).url
    for _ in range(6):
        assert chat(url).status_code == 200
    assert bad.stats.requests >= 1
    assert good.stats.requests == 6
    bad.options.fail_status = 429
    good.stats.reset()
    for _ in range(4):
        assert chat(url).status_code == 200
    assert good.stats.requests == 4


def test_retry_after_connect_error(servers: Servers) -> None:
    good = servers.stub()
    url = servers.gateway(two_deployments("http://127.0.0.1:9/v1", good.url)).url
    for _ in range(5):
        assert chat(url).status_code == 200
    assert good.stats.requests == 5


def test_4xx_is_not_retried(servers: Servers) -> None:
    a, b = servers.stub(fail_status=400), servers.stub(fail_status=400)
    url = servers.gateway(two_deployments(a.url, b.url)).url
    assert chat(url).status_code == 400
    assert a.stats.requests + b.stats.requests == 1


def test_all_deployments_failing_returns_the_upstream_error(servers: Servers) -> None:
    a, b = servers.stub(fail_status=500), servers.stub(fail_status=502)
    url = servers.gateway(two_deployments(a.url, b.url)).url
    r = chat(url)
    assert r.status_code in (500, 502) and "stub error" in r.json()["error"]["message"]
    assert a.stats.requests == 1 and b.stats.requests == 1


def test_failing_deployment_cools_down_then_returns(servers: Servers) -> None:
    bad, good = servers.stub(fail_status=500), servers.stub()
    url = servers.gateway(two_deployments(bad.url, good.url, allowed_fails=2, cooldown=2.0)).url
    start = time.monotonic()
    for _ in range(30):
        assert chat(url).status_code == 200
    assert time.monotonic() - start < 2.0
    assert bad.stats.requests == 2  # two failures, then rested for the whole cool-down
    bad.options.fail_status = None
    time.sleep(2.1)
    bad.stats.reset()
    for _ in range(20):
        assert chat(url).status_code == 200
    assert bad.stats.requests > 0  # back in rotation


async def test_least_inflight_balancing(servers: Servers) -> None:
    a, b = servers.stub(delay=0.3), servers.stub(delay=0.3)
    url = servers.gateway(two_deployments(a.url, b.url)).url
    async with httpx.AsyncClient(timeout=10) as c:
        rs = await asyncio.gather(
            *(
                c.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MSG})
                for _ in range(20)
            )
        )
    assert all(r.status_code == 200 for r in rs)
    assert a.stats.requests == 10 and b.stats.requests == 10


def test_weights(servers: Servers) -> None:
    a, b = servers.stub(), servers.stub()
    config = two_deployments(a.url, b.url)
    config["models"][0]["deployments"][0]["weight"] = 3
    url = servers.gateway(config).url
    with httpx.Client() as c:
        for _ in range(200):
            c.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MSG})
    # Sequential requests all see zero in flight: the weight breaks the tie, so `a` wins
    # most of them; it must never starve `b` once `a` is busy (see least-inflight test).
    assert a.stats.requests + b.stats.requests == 200
    assert a.stats.requests >= b.stats.requests


def test_timeout_header_and_body_field(servers: Servers) -> None:
    stub = servers.stub(delay=2.0)
    url = servers.gateway(
        {"providers": {"up": {"base_url": stub.url}}, "models": [{"name": "m", "provider": "up"}]}
    ).url
    start = time.monotonic()
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": MSG},
        headers={"x-lmgate-timeout": "0.3"},
        timeout=10,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": MSG, "timeout": 0.3},
        timeout=10,
    )
    assert r.status_code == 504 and time.monotonic() - start < 1.5
    stub.options.delay = 0
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MSG, "timeout": 5})
    assert r.status_code == 200
    assert "timeout" not in stub.stats.last_request["body"]  # the gateway's field is stripped
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": MSG},
        headers={"x-lmgate-timeout": "soon"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"


def test_provider_read_timeout(servers: Servers) -> None:
    stub = servers.stub(delay=2.0)
    url = servers.gateway(
        {
            "providers": {"up": {"base_url": stub.url, "timeout": {"read": 0.3}}},
            "models": [{"name": "m", "provider": "up"}],
        }
    ).url
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MSG}, timeout=10)
    assert r.status_code == 504 and time.monotonic() - start < 1.5
    assert stub.stats.requests == 1  # a read timeout is not retried: the upstream may be working


def test_sdk_retries_through_gateway_timeout_override(servers: Servers) -> None:
    stub = servers.stub(delay=1.0)
    url = servers.gateway(
        {"providers": {"up": {"base_url": stub.url}}, "models": [{"name": "m", "provider": "up"}]}
    ).base_url
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(
            model="m", messages=MSG, extra_headers={"x-lmgate-timeout": "0.2"}
        )
    assert e.value.status_code == 504
