"""The response cache end to end: a gateway with `cache: {enabled: true}` in front of the stub.

NOTE: these tests fail until the cache is integrated into the gateway (`cache:` in the
configuration schema, `lmgate.cache.ResponseCache` wired into `lmgate/api/app.py`, and the
ledger's `cache_hit`). Everything below the gateway is tested in the other test_cache_* files.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import openai
import orjson
import pytest

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_team, create_user
from tests.harness import Servers, one_model
from tests.test_keys_and_ledger import gateway_config, ledger_rows

MSG = [{"role": "user", "content": "one two three"}]
BODY: dict[str, Any] = {"model": "m1", "messages": MSG, "temperature": 0}


def cached(stub_url: str, **cache: Any) -> dict[str, Any]:
    return {**one_model(stub_url), "cache": {"enabled": True, "backend": "memory", **cache}}


def post(url: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    r = httpx.post(f"{url}/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return r


def test_miss_then_hit(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url)).base_url
    first = post(url, BODY)
    assert first.headers["x-lmgate-cache"] == "miss"
    second = post(url, {**BODY, "user": "someone", "timeout": 30})
    assert second.headers["x-lmgate-cache"] == "hit"
    assert second.content == first.content
    assert stub.stats.requests == 1
    assert post(url, {**BODY, "max_tokens": 2}).headers["x-lmgate-cache"] == "miss"
    assert stub.stats.requests == 2


def test_non_deterministic_requests_are_not_cached(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url)).base_url
    body = {**BODY, "temperature": 0.7}
    assert "x-lmgate-cache" not in post(url, body).headers
    assert "x-lmgate-cache" not in post(url, body).headers
    assert stub.stats.requests == 2


def test_ttl_header(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url)).base_url
    assert post(url, BODY, **{"x-lmgate-cache-ttl": "1"}).headers["x-lmgate-cache"] == "miss"
    assert post(url, BODY).headers["x-lmgate-cache"] == "hit"
    time.sleep(1.1)
    assert post(url, BODY).headers["x-lmgate-cache"] == "miss"
    assert stub.stats.requests == 2

    r = httpx.post(f"{url}/chat/completions", json=BODY, headers={"x-lmgate-cache-ttl": "soon"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cache_ttl"


def test_default_ttl(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url, default_ttl=1)).base_url
    post(url, BODY)
    time.sleep(1.1)
    assert post(url, BODY).headers["x-lmgate-cache"] == "miss"
    assert stub.stats.requests == 2


def test_no_cache_and_no_store(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url)).base_url
    body = {**BODY, "stub": {"content": "first answer"}}
    post(url, body, **{"cache-control": "no-store"})
    assert post(url, body).headers["x-lmgate-cache"] == "miss"  # no-store stored nothing
    assert stub.stats.requests == 2

    # no-cache goes upstream and replaces the stored answer
    refreshed = post(url, body, **{"cache-control": "no-cache"})
    assert refreshed.headers["x-lmgate-cache"] == "miss" and stub.stats.requests == 3
    hit = post(url, body)
    assert hit.headers["x-lmgate-cache"] == "hit" and hit.content == refreshed.content

    r = post(url, body, **{"cache-control": "no-store"})
    assert "x-lmgate-cache" not in r.headers and stub.stats.requests == 4


def test_stream_replayed_from_a_complete_answer(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(cached(stub.url))
    expected = post(gw.base_url, BODY).json()["choices"][0]["message"]["content"]
    sdk = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)

    with sdk.chat.completions.with_streaming_response.create(
        model="m1", messages=MSG, temperature=0, stream=True
    ) as raw:
        assert raw.headers["x-lmgate-cache"] == "hit"
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"

    stream = sdk.chat.completions.create(
        model="m1",
        messages=MSG,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == len(expected.split())
    assert stub.stats.requests == 1


def test_recorded_stream_answers_a_later_request(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(cached(stub.url))
    # With accounting on, the gateway asks for the usage itself; here the client asks.
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", json=body) as r:
        assert r.headers["x-lmgate-cache"] == "miss"
        streamed = b"".join(r.iter_bytes())
    assert streamed.rstrip().endswith(b"data: [DONE]")
    hit = post(gw.base_url, BODY)
    assert hit.headers["x-lmgate-cache"] == "hit"
    answer = hit.json()
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] > 0  # the gateway's recording had the usage
    sdk = openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)
    again = sdk.chat.completions.create(model="m1", messages=MSG, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in again if c.choices)
    assert text == answer["choices"][0]["message"]["content"]
    assert stub.stats.requests == 1


def test_broken_stream_is_not_cached(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(cached(stub.url)).base_url
    body = {**BODY, "stream": True, "stub": {"drop_after": 1}}
    for _ in range(2):
        with httpx.stream("POST", f"{url}/chat/completions", json=body) as r:
            b"".join(r.iter_bytes())
    assert stub.stats.requests == 2


@pytest.mark.parametrize("bill_hits", [False, True])
async def test_scope_per_key_and_ledger(servers: Servers, db: Database, bill_hits: bool) -> None:
    stub = servers.stub()
    await create_team(db, "physics")
    await create_user(db, "alice", team="physics")
    _, laptop = await create_key(db, "alice", name="laptop")
    _, phone = await create_key(db, "alice", name="phone")
    config = gateway_config(stub.url, db, prices={"m1": {"input": 1000.0, "output": 1000.0}})
    config["cache"] = {"enabled": True, "scope": "key", "bill_hits": bill_hits}
    gw = servers.gateway(config)

    def ask(key: str) -> httpx.Response:
        return post(gw.base_url, BODY, authorization=f"Bearer {key}")

    assert ask(laptop).headers["x-lmgate-cache"] == "miss"
    hit = ask(laptop)
    assert hit.headers["x-lmgate-cache"] == "hit"
    assert ask(phone).headers["x-lmgate-cache"] == "miss"  # another key: its own cache
    assert stub.stats.requests == 2

    rows = await ledger_rows(db, 3)
    assert [r.cache_hit for r in rows] == [False, True, False]
    paid, served = rows[0], rows[1]
    assert paid.cost > 0 and served.status == 200
    assert served.prompt_tokens == paid.prompt_tokens
    assert served.completion_tokens == paid.completion_tokens
    assert served.cost == (paid.cost if bill_hits else 0.0)
    assert float(hit.headers.get("x-lmgate-cost", served.cost)) == pytest.approx(served.cost)


async def test_team_scope(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_team(db, "physics")
    for name in ("alice", "bob"):
        await create_user(db, name, team="physics")
    await create_user(db, "carol")
    keys = {name: (await create_key(db, name))[1] for name in ("alice", "bob", "carol")}
    config = gateway_config(stub.url, db)
    config["cache"] = {"enabled": True, "scope": "team"}
    gw = servers.gateway(config)
    outcomes = [
        post(gw.base_url, BODY, authorization=f"Bearer {keys[n]}").headers["x-lmgate-cache"]
        for n in ("alice", "bob", "carol")
    ]
    assert outcomes == ["miss", "hit", "miss"]
    body = orjson.loads(post(gw.base_url, BODY, authorization=f"Bearer {keys['carol']}").content)
    assert body["object"] == "chat.completion"
