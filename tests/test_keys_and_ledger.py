"""Keys, budgets and the ledger end to end: the official SDK against a gateway on a real
database (SQLite and PostgreSQL), upstreams of our own, and the rows the ledger writes."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web
from sqlalchemy import func, select

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key, revoke_key
from lmgate.storage.models import BodyLog, UsageRecord
from lmgate.storage.users import create_team, create_user
from tests.harness import LoopThread, Servers

MSG = [{"role": "user", "content": "hi"}]
ADMIN = "admin-secret-for-tests"


def gateway_config(stub_url: str, db: Database, **accounting: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"base_url": stub_url}},
        "models": [{"name": "m1", "provider": "up"}, {"name": "other", "provider": "up"}],
        "database": {"url": db.url},
        "auth": {"enabled": True, "admin_key": ADMIN, "refresh_interval": 0.2},
        "accounting": {"enabled": True, "flush_interval": 0.1, **accounting},
    }


async def ledger_rows(db: Database, expected: int, timeout: float = 5.0) -> list[UsageRecord]:
    """The ledger's rows, once `expected` of them have been written."""
    deadline = time.monotonic() + timeout
    while True:
        async with db.session() as s:
            rows = list((await s.scalars(select(UsageRecord).order_by(UsageRecord.id))).all())
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


def client(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)


async def test_key_lifecycle(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_team(db, "physics")
    await create_user(db, "alice", team="physics")
    row, secret = await create_key(db, "alice", name="laptop", models=["m*"])
    gw = servers.gateway(gateway_config(stub.url, db))
    sdk = client(gw.base_url, secret)

    raw = await sdk.chat.completions.with_raw_response.create(model="m1", messages=MSG)
    assert float(raw.headers["x-lmgate-cost"]) == 0.0  # m1 has no price
    assert [m.id for m in (await sdk.models.list()).data] == ["m1"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk.chat.completions.create(model="other", messages=MSG)
    assert denied.value.code == "model_not_allowed"

    # The same key as `api-key` (Azure style) and inside the path (old clients).
    r = httpx.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m1", "messages": MSG},
        headers={"api-key": secret},
    )
    assert r.status_code == 200
    assert (await client(f"{gw.url}/{secret}/v1", "unused").models.list()).data

    for bad in ["", "lmg-not-a-key", "sk-foreign"]:
        with pytest.raises(openai.AuthenticationError) as e:
            await client(gw.base_url, bad or "x").chat.completions.create(model="m1", messages=MSG)
        assert e.value.code == "invalid_api_key"
    assert httpx.get(f"{gw.base_url}/models").status_code == 401

    rows = await ledger_rows(db, 2)
    ok = [r for r in rows if r.status == 200]
    assert len(ok) == 2 and {r.key_id for r in ok} == {row.id}
    assert all(r.user_id == row.user_id and r.team_id is not None for r in ok)
    assert ok[0].prompt_tokens > 0 and ok[0].completion_tokens > 0 and not ok[0].estimated

    await revoke_key(db, row.prefix)
    revoked_at = time.monotonic()
    while True:
        try:
            await sdk.chat.completions.create(model="m1", messages=MSG)
        except openai.AuthenticationError:
            break
        assert time.monotonic() - revoked_at < 1.0, "revocation took more than a second"
        await asyncio.sleep(0.05)


async def test_expired_key(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_user(db, "bob")
    _, secret = await create_key(db, "bob", expires_in=timedelta(seconds=1))
    gw = servers.gateway(gateway_config(stub.url, db))
    await client(gw.base_url, secret).chat.completions.create(model="m1", messages=MSG)
    await asyncio.sleep(1.1)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await client(gw.base_url, secret).chat.completions.create(model="m1", messages=MSG)


async def test_budget_holds_under_concurrency(servers: Servers, db: Database) -> None:
    """50 concurrent requests, a budget with room for 10: the spend never exceeds the budget
    by more than one reservation, and every refusal is `insufficient_quota`."""
    stub = servers.stub(delay=0.05)
    await create_user(db, "carol")
    # Output at $1,000/M tokens, input free: a reply of 7 words costs $0.007; a request
    # with max_tokens=10 reserves $0.010. A $0.07 budget has room for 10 replies.
    prices = {"m1": {"input": 0.0, "output": 1000.0}}
    _, secret = await create_key(db, "carol", budget=(0.07, "month"))
    gw = servers.gateway(gateway_config(stub.url, db, prices=prices))
    sdk = client(gw.base_url, secret)

    async def one() -> str:
        try:
            await sdk.chat.completions.create(model="m1", messages=MSG, max_tokens=10)
            return "ok"
        except openai.RateLimitError as e:
            assert e.code == "insufficient_quota" and "Budget exceeded" in e.message
            assert e.response.headers["x-should-retry"] == "false"
            return "refused"

    outcomes = await asyncio.gather(*(one() for _ in range(50)))
    rows = await ledger_rows(db, 50)
    spent = sum(r.cost for r in rows)
    assert spent <= 0.07 + 0.010 + 1e-9
    assert 7 <= outcomes.count("ok") <= 11
    assert outcomes.count("ok") + outcomes.count("refused") == 50
    assert sum(1 for r in rows if r.error_type == "insufficient_quota") == outcomes.count("refused")


@pytest.mark.parametrize("include_usage", [True, False])
async def test_stream_usage_is_exact(servers: Servers, db: Database, include_usage: bool) -> None:
    stub = servers.stub()
    await create_user(db, "dave")
    _, secret = await create_key(db, "dave")
    gw = servers.gateway(gateway_config(stub.url, db))
    body: dict[str, Any] = {"model": "m1", "messages": MSG, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    events = []
    async with (
        httpx.AsyncClient() as c,
        c.stream(
            "POST",
            f"{gw.base_url}/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}"},
        ) as r,
    ):
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                events.append(orjson.loads(line[6:]))
    usage_chunks = [e for e in events if e.get("usage")]
    direct = httpx.post(f"{stub.url}/chat/completions", json={"model": "m1", "messages": MSG})
    expected = direct.json()["usage"]
    if include_usage:
        assert usage_chunks and usage_chunks[-1]["usage"] == expected
    else:
        assert usage_chunks == [] and all(e["choices"] for e in events)
        assert stub.stats.last_request is not None  # the gateway asked the upstream itself
    (row,) = await ledger_rows(db, 1)
    assert (row.prompt_tokens, row.completion_tokens) == (
        expected["prompt_tokens"],
        expected["completion_tokens"],
    )
    assert row.streamed and not row.estimated and row.ttft_ms is not None


async def _no_usage_upstream(request: web.Request) -> web.Response:
    """An OpenAI-compatible upstream that reports no usage, as some servers do."""
    return web.json_response(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m1",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": "one two three four"},
                }
            ],
        }
    )


async def test_usage_estimated_when_upstream_gives_none(
    servers: Servers, db: Database, loop_thread: LoopThread
) -> None:
    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _no_usage_upstream)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = loop_thread.run(start())
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        await create_user(db, "erin")
        _, secret = await create_key(db, "erin")
        gw = servers.gateway(gateway_config(url, db))
        await client(gw.base_url, secret).chat.completions.create(model="m1", messages=MSG)
        (row,) = await ledger_rows(db, 1)
        assert row.estimated and row.completion_tokens == 4 and row.prompt_tokens > 0
    finally:
        loop_thread.run(runner.cleanup())


async def test_body_logging_opt_in(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_user(db, "frank")
    _, logged = await create_key(db, "frank", log_bodies=True)
    _, quiet = await create_key(db, "frank")
    gw = servers.gateway(gateway_config(stub.url, db))
    for key, word in [(logged, "remember me"), (quiet, "forget me")]:
        await client(gw.base_url, key).chat.completions.create(
            model="m1", messages=[{"role": "user", "content": word}]
        )
    await ledger_rows(db, 2)
    async with db.session() as s:
        logs = (await s.scalars(select(BodyLog))).all()
    assert len(logs) == 1 and "remember me" in logs[0].request
    assert "remember me" in logs[0].response


async def test_admin_api_is_mounted(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    gw = servers.gateway(gateway_config(stub.url, db))
    async with httpx.AsyncClient(base_url=f"{gw.url}/admin") as c:
        assert (await c.get("/users")).status_code == 401
        auth = {"authorization": f"Bearer {ADMIN}"}
        r = await c.post("/users", json={"name": "gina"}, headers=auth)
        assert r.status_code in (200, 201), r.text
        r = await c.post("/keys", json={"user": "gina", "name": "k"}, headers=auth)
        secret = r.json()["secret"] if "secret" in r.json() else r.json()["key"]
        assert (await c.get("/openapi.json")).status_code == 401
        assert (await c.get("/openapi.json", headers=auth)).json()["openapi"].startswith("3.")
    completion = await client(gw.base_url, secret).chat.completions.create(model="m1", messages=MSG)
    assert completion.choices
    async with db.session() as s:
        assert await s.scalar(select(func.count()).select_from(UsageRecord)) is not None
