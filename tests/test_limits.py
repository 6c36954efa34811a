"""Rate limits in one process and in Redis: requests, tokens and requests in flight, OpenAI's
headers, and what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import update

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.models import ApiKey
from lmgate.storage.timeutil import utcnow
from lmgate.storage.users import create_user
from tests.harness import Servers
from tests.redisfixtures import PrivateRedis

MSG = [{"role": "user", "content": "hi"}]


def config(stub_url: str, limits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"base_url": stub_url}},
        "models": [{"name": "m1", "provider": "up"}],
        "limits": limits,
        **extra,
    }


def post(url: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json={"model": "m1", "messages": MSG}, headers=headers
    )


def test_requests_per_minute_and_headers(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(config(stub.url, {"model": {"m1": {"rpm": 5}}}))
    answers = [post(gw.url) for _ in range(7)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 2
    first, refused = answers[0], answers[5]
    assert first.headers["x-ratelimit-limit-requests"] == "5"
    assert first.headers["x-ratelimit-remaining-requests"] == "4"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    err = refused.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert "Limit 5, Used 5" in err["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert stub.stats.requests == 5


def test_streams_carry_the_headers_too(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(config(stub.url, {"model": {"*": {"rpm": 100}}}))
    body = {"model": "m1", "messages": MSG, "stream": True}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.headers["x-ratelimit-remaining-requests"] == "99"
        assert list(r.iter_lines())


def test_sdk_sees_rate_limit_error(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(config(stub.url, {"model": {"m1": {"rpm": 1}}}))
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0)
    client.chat.completions.create(model="m1", messages=MSG)
    with pytest.raises(openai.RateLimitError) as e:
        client.chat.completions.create(model="m1", messages=MSG)
    assert e.value.code == "rate_limit_exceeded"


async def test_requests_in_flight(servers: Servers) -> None:
    stub = servers.stub(delay=0.4)
    gw = servers.gateway(config(stub.url, {"model": {"m1": {"max_parallel": 2}}}))
    async with httpx.AsyncClient(timeout=10) as c:
        rs = await asyncio.gather(
            *(
                c.post(f"{gw.url}/v1/chat/completions", json={"model": "m1", "messages": MSG})
                for _ in range(5)
            )
        )
        assert sorted(r.status_code for r in rs) == [200, 200, 429, 429, 429]
        # The slots come back when the requests end.
        r = await c.post(f"{gw.url}/v1/chat/completions", json={"model": "m1", "messages": MSG})
        assert r.status_code == 200


async def test_deployment_max_inflight(servers: Servers) -> None:
    stub = servers.stub(delay=0.4)
    cfg = {
        "providers": {"up": {"base_url": stub.url}},
        "models": [{"name": "m1", "deployments": [{"provider": "up", "max_inflight": 1}]}],
    }
    gw = servers.gateway(cfg)
    async with httpx.AsyncClient(timeout=10) as c:
        rs = await asyncio.gather(
            *(
                c.post(f"{gw.url}/v1/chat/completions", json={"model": "m1", "messages": MSG})
                for _ in range(3)
            )
        )
    codes = sorted(r.status_code for r in rs)
    assert codes == [200, 429, 429]
    assert {r.json()["error"]["code"] for r in rs if r.status_code == 429} == {"deployment_busy"}


async def test_tokens_per_minute_with_real_counts(servers: Servers, db: Database) -> None:
    """Each request uses 11 tokens (4 prompt + 7 completion at the stub); a request is admitted
    with an estimate (21 tokens for this body), corrected to the real count at the end."""
    stub = servers.stub()
    await create_user(db, "tess")
    _, secret = await create_key(db, "tess")
    gw = servers.gateway(
        config(
            stub.url,
            {"key": {"tpm": 660}},
            database={"url": db.url},
            auth={"enabled": True},
            accounting={"enabled": True, "flush_interval": 0.1},
        )
    )
    codes = [post(gw.url, authorization=f"Bearer {secret}").status_code for _ in range(70)]
    assert codes.count(200) in (59, 60, 61)
    assert set(codes[codes.count(200) :]) == {429}


async def test_a_keys_own_limits(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_user(db, "uma")
    row, secret = await create_key(db, "uma")
    async with db.session() as s, s.begin():
        await s.execute(
            update(ApiKey).where(ApiKey.id == row.id).values(limits={"rpm": 2}, updated_at=utcnow())
        )
    gw = servers.gateway(
        config(
            stub.url,
            {"key": {"rpm": 100}},
            database={"url": db.url},
            auth={"enabled": True},
        )
    )
    codes = [post(gw.url, authorization=f"Bearer {secret}").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_redis_going_away_and_back(
    servers: Servers, private_redis: PrivateRedis, policy: str
) -> None:
    stub = servers.stub()
    limits = {
        "model": {"m1": {"rpm": 1000}},
        "redis_url": private_redis.url,
        "on_redis_failure": policy,
    }
    gw = servers.gateway(config(stub.url, limits))
    assert post(gw.url).status_code == 200
    private_redis.stop()
    r = post(gw.url)
    if policy == "open":
        assert r.status_code == 200  # per-process limits meanwhile
    else:
        assert r.status_code == 503 and r.json()["error"]["code"] == "limits_unavailable"
    private_redis.start()
    for _ in range(40):  # the limiter retries Redis a second after a failure
        r = post(gw.url)
        if r.status_code == 200:
            break
        time.sleep(0.1)
    assert r.status_code == 200
    # Back in Redis: the count there starts again from the restarted (empty) server.
    assert int(r.headers["x-ratelimit-remaining-requests"]) >= 998
