"""Native endpoints through a gateway: ARGO's own API, `/v1/messages` passed to Anthropic as is.

Also: the ledger of native Messages (Anthropic's usage with cache tokens, stream or not), the
`x-api-key` header, ARGO streams estimated, and clean 400s for paths a provider cannot serve.
"""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import openai
import pytest

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_user
from lmgate.testing.argo_stub import REPLY_PREFIX as ARGO_PREFIX
from tests.harness import RunningGateway, Servers
from tests.test_adapters_gateway import MSG, Upstreams, upstreams  # noqa: F401
from tests.test_keys_and_ledger import ledger_rows

ARGO_BODY = {"user": "bob", "model": "gpt4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def gw(servers: Servers, upstreams: Upstreams) -> RunningGateway:  # noqa: F811
    return servers.gateway(upstreams.config())


def test_argo_native_endpoints(gw: RunningGateway, upstreams: Upstreams) -> None:  # noqa: F811
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        r = http.post("/v1/chat", json=ARGO_BODY)
        assert r.status_code == 200 and r.json() == {"response": ARGO_PREFIX + "hi"}
        assert upstreams.argo.stats.last_request is not None
        assert upstreams.argo.stats.last_request["body"]["user"] == "bob"  # as sent
        with http.stream("POST", "/argo/v1/streamchat", json=ARGO_BODY) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/plain")
            assert "".join(s.iter_text()) == ARGO_PREFIX + "hi"
        r = http.post("/v1/embed", json={"user": "bob", "model": "v3small", "prompt": ["a"]})
        assert r.status_code == 200 and len(r.json()["embedding"]) == 1
        r = http.get("/v1/status")
        assert r.status_code == 200 and r.json()["status"] == "alive"
        r = http.get("/v1/chat")
        assert r.status_code == 405
        r = http.post("/argo/v1/responses", json={"model": "gpt4o", "input": "hi"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_path"


def test_argo_status_down(servers: Servers, upstreams: Upstreams) -> None:  # noqa: F811
    config = upstreams.config()
    config["providers"]["argo"]["base_url"] = "http://127.0.0.1:9/argoapi/api/v1"
    gw = servers.gateway(config)
    r = httpx.get(f"{gw.url}/v1/status", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "down", "upstream_status": None}


def test_provider_prefixed_chat_is_converted(gw: RunningGateway) -> None:
    sdk = openai.OpenAI(base_url=f"{gw.url}/claude/v1", api_key="unused", max_retries=0)
    answer = sdk.chat.completions.create(model="claude-sonnet-4-20250514", messages=MSG)  # type: ignore[arg-type]
    assert answer.choices[0].message.content and answer.usage is not None


def test_messages_errors_in_anthropic_format(gw: RunningGateway) -> None:
    sdk = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.NotFoundError) as e:
        sdk.messages.create(
            model="nope", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert e.value.body["type"] == "error"  # type: ignore[index]
    for model in ("claude-sonnet", "m1"):  # no max_tokens
        body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
        r = httpx.post(f"{gw.url}/v1/messages", json=body, headers={"x-api-key": "k"})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.InternalServerError) as overloaded:
        sdk.messages.create(
            model="claude-sonnet",
            max_tokens=10,
            messages=[{"role": "user", "content": "x [stub status=529]"}],
        )
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_messages_native_stream_error_event(gw: RunningGateway) -> None:
    sdk = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "a long enough answer [stub error_after=2]"}]
    with pytest.raises(anthropic.APIStatusError):  # noqa: SIM117
        with sdk.messages.stream(model="claude-sonnet", max_tokens=100, messages=ask) as s:  # type: ignore[arg-type]
            s.get_final_message()


async def test_messages_ledger(
    upstreams: Upstreams,  # noqa: F811
    servers: Servers,
    db: Database,
) -> None:
    await create_user(db, "bob")
    _, secret = await create_key(db, "bob")
    config: dict[str, Any] = {
        **upstreams.config(),
        "database": {"url": db.url},
        "auth": {"enabled": True, "refresh_interval": 0.2},
        "accounting": {"enabled": True, "flush_interval": 0.1},
    }
    config["providers"]["argo"]["argo_user_per_key"] = True
    gw = servers.gateway(config)
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key=secret, max_retries=0)  # x-api-key
    system: Any = [
        {"type": "text", "text": "be brief " * 5, "cache_control": {"type": "ephemeral"}}
    ]
    first = await sdk.messages.create(
        model="claude-sonnet",
        max_tokens=50,
        system=system,
        messages=MSG,  # type: ignore[arg-type]
    )
    async with sdk.messages.stream(
        model="claude-sonnet",
        max_tokens=50,
        system=system,
        messages=MSG,  # type: ignore[arg-type]
    ) as s:
        second = await s.get_final_message()
    assert first.model == second.model == "claude-sonnet"
    oai = openai.AsyncOpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)
    stream = await oai.chat.completions.create(model="argo:gpt-4o", messages=MSG, stream=True)  # type: ignore[arg-type]
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == ARGO_PREFIX + "hello there"
    rows = await ledger_rows(db, 3)
    by_key = {(r.model, r.streamed): r for r in rows}
    cached = by_key[("claude-sonnet", False)]
    u = first.usage
    written = u.cache_creation_input_tokens or 0
    assert written > 0 and not cached.estimated
    assert cached.prompt_tokens == u.input_tokens + written and cached.cached_tokens == 0
    streamed = by_key[("claude-sonnet", True)]
    assert streamed.cached_tokens == written and not streamed.estimated
    assert streamed.completion_tokens == second.usage.output_tokens
    argo = by_key[("argo:gpt-4o", True)]
    assert argo.estimated and argo.prompt_tokens > 0 and argo.completion_tokens > 0
    assert upstreams.argo.stats.last_request is not None
    assert upstreams.argo.stats.last_request["body"]["user"] == "bob"
