"""ARGO and Anthropic upstreams and the `/v1/messages` entrance, end to end through a gateway.

The official openai SDK talks to ARGO and Anthropic models (served by our stubs), the
official anthropic SDK to `/v1/messages` served by an OpenAI-compatible model and by an
Anthropic one; every OpenAI response and chunk is validated against OpenAI's description,
and the ledger must hold exact tokens for Anthropic and estimated ones for ARGO.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_user
from lmgate.testing.anthropic_stub import REPLY_PREFIX as CLAUDE_PREFIX
from lmgate.testing.anthropic_stub import AnthropicStubOptions, start_anthropic_stub
from lmgate.testing.argo_stub import REPLY_PREFIX as ARGO_PREFIX
from lmgate.testing.argo_stub import RunningServer, start_argo_stub
from tests.harness import LoopThread, RunningGateway, Servers
from tests.infra.openapi import validate
from tests.test_adapters_argo import TOOLS, validate_chunk
from tests.test_adapters_entrance import WEATHER
from tests.test_adapters_entrance_sdk import fake_openai
from tests.test_keys_and_ledger import ledger_rows

MSG = [{"role": "user", "content": "hello there"}]


def config(argo: RunningServer, claude: RunningServer, openai_url: str) -> dict[str, Any]:
    return {
        "providers": {
            "argo": {"type": "argo", "base_url": argo.url, "argo_user": "alice"},
            "claude": {"type": "anthropic", "base_url": claude.url, "api_key": "sk-ant-test"},
            "up": {"base_url": openai_url},
        },
        "models": [
            {"name": "argo:gpt-4o", "provider": "argo", "model": "gpt4o"},
            {"name": "argo:text-embedding-3-small", "provider": "argo", "model": "v3small"},
            {"name": "claude-sonnet", "provider": "claude", "model": "claude-sonnet-4-20250514"},
            {"name": "m1", "provider": "up"},
        ],
    }


class Upstreams:
    """The ARGO and Anthropic stubs, and an OpenAI upstream that calls tools."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self.thread = loop_thread
        self.argo = loop_thread.run(start_argo_stub())
        options = AnthropicStubOptions(api_key="sk-ant-test")
        self.claude = loop_thread.run(start_anthropic_stub(options))
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", fake_openai)])
        self.runner = web.AppRunner(app)
        loop_thread.run(self._start())

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"

    def config(self) -> dict[str, Any]:
        return config(self.argo, self.claude, self.openai_url)

    def close(self) -> None:
        for server in (self.argo, self.claude):
            self.thread.run(server.close())
        self.thread.run(self.runner.cleanup())


@pytest.fixture
def upstreams(loop_thread: LoopThread) -> Iterator[Upstreams]:
    ups = Upstreams(loop_thread)
    yield ups
    ups.close()


@pytest.fixture
def gw(servers: Servers, upstreams: Upstreams) -> RunningGateway:
    return servers.gateway(upstreams.config())


@pytest.fixture
def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="unused", max_retries=0)


def raw_chunks(client: openai.OpenAI, **params: Any) -> list[dict[str, Any]]:
    """A streamed chat's chunks, each validated."""
    raw = client.chat.completions.with_raw_response.create(stream=True, **params)
    objs = []
    for line in raw.http_response.iter_lines():
        if line.startswith("data: {"):
            obj = orjson.loads(line[6:])
            validate_chunk("chat", obj)
            objs.append(obj)
    return objs


@pytest.mark.parametrize(
    ("model", "prefix"), [("argo:gpt-4o", ARGO_PREFIX), ("claude-sonnet", CLAUDE_PREFIX)]
)
def test_chat_and_stream(client: openai.OpenAI, model: str, prefix: str) -> None:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG)
    obj = orjson.loads(raw.content)
    validate("CreateChatCompletionResponse", obj)
    assert obj["model"] == model
    assert obj["choices"][0]["message"]["content"] == prefix + "hello there"
    chunks = raw_chunks(client, model=model, messages=MSG, stream_options={"include_usage": True})
    text = "".join(c["delta"].get("content") or "" for o in chunks for c in o["choices"])
    assert text == prefix + "hello there"
    assert chunks[-1]["usage"] is not None or model.startswith("argo:")


@pytest.mark.parametrize("model", ["argo:gpt-4o", "claude-sonnet"])
def test_legacy_completions(client: openai.OpenAI, model: str) -> None:
    raw = client.completions.with_raw_response.create(model=model, prompt="say hi")
    validate("CreateCompletionResponse", orjson.loads(raw.content))
    stream = client.completions.create(model=model, prompt="say hi", stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices).endswith("say hi")


def test_argo_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="argo:text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    raw = client.embeddings.with_raw_response.create(
        model="argo:text-embedding-3-small", input="a", encoding_format="float"
    )
    validate("CreateEmbeddingResponse", orjson.loads(raw.content))


@pytest.mark.parametrize("model", ["argo:gpt-4o", "claude-sonnet"])
@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls(client: openai.OpenAI, model: str, stream: bool) -> None:
    ask = [{"role": "user", "content": 'use the tool get_weather with {"city": "Oslo"}'}]
    if stream:
        chunks = raw_chunks(client, model=model, messages=ask, tools=TOOLS)
        calls = [t for o in chunks for c in o["choices"] for t in c["delta"].get("tool_calls", [])]
        arguments = "".join(c["function"].get("arguments", "") for c in calls)
        call_id, name = calls[0]["id"], calls[0]["function"]["name"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=ask, tools=TOOLS
        )
        obj = orjson.loads(raw.content)
        validate("CreateChatCompletionResponse", obj)
        (call,) = obj["choices"][0]["message"]["tool_calls"]
        call_id, name, arguments = (
            call["id"],
            call["function"]["name"],
            call["function"]["arguments"],
        )
        assert obj["choices"][0]["finish_reason"] == "tool_calls"
    assert name == "get_weather" and orjson.loads(arguments) == {"city": "Oslo"}
    follow_up = [
        *ask,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]
    answer = client.chat.completions.create(model=model, messages=follow_up, tools=TOOLS)  # type: ignore[arg-type]
    assert "sunny" in (answer.choices[0].message.content or "")


@pytest.mark.parametrize(
    ("model", "status", "error"),
    [
        ("argo:gpt-4o", 400, openai.BadRequestError),
        ("claude-sonnet", 429, openai.RateLimitError),
        ("claude-sonnet", 529, openai.InternalServerError),
    ],
)
def test_errors(client: openai.OpenAI, model: str, status: int, error: type[Exception]) -> None:
    messages = [{"role": "user", "content": f"x [stub status={status}]"}]
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=messages)  # type: ignore[arg-type]
    assert isinstance(e.value, error)
    validate("ErrorResponse", e.value.response.json())


def test_unsupported_is_a_clean_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="claude-sonnet", messages=MSG, n=2)  # type: ignore[arg-type]
    validate("ErrorResponse", e.value.response.json())


@pytest.mark.parametrize("model", ["m1", "claude-sonnet"])
@pytest.mark.parametrize("stream", [False, True])
def test_messages_entrance(gw: RunningGateway, model: str, stream: bool) -> None:
    sdk = anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0)
    params: dict[str, Any] = {
        "model": model,
        "max_tokens": 100,
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": 'use the tool get_weather with {"city": "Oslo"}'}],
    }
    if stream:
        with sdk.messages.stream(**params) as s:
            message = s.get_final_message()
    else:
        message = sdk.messages.create(**params)
    assert message.model == model and message.stop_reason == "tool_use"
    call = next(b for b in message.content if b.type == "tool_use")
    assert (call.name, call.input) == ("get_weather", {"city": "Oslo"})
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    text = sdk.messages.create(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    )
    assert text.content and text.content[0].type in ("text", "tool_use")


async def test_ledger_tokens(upstreams: Upstreams, servers: Servers, db: Database) -> None:
    await create_user(db, "alice")
    _, secret = await create_key(db, "alice")
    cfg = {
        **upstreams.config(),
        "database": {"url": db.url},
        "auth": {"enabled": True, "refresh_interval": 0.2},
        "accounting": {"enabled": True, "flush_interval": 0.1},
    }
    gw = servers.gateway(cfg)
    sdk = openai.AsyncOpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)
    claude = await sdk.chat.completions.create(model="claude-sonnet", messages=MSG)  # type: ignore[arg-type]
    stream = await sdk.chat.completions.create(model="claude-sonnet", messages=MSG, stream=True)  # type: ignore[arg-type]
    async for _ in stream:
        pass
    await sdk.chat.completions.create(model="argo:gpt-4o", messages=MSG)  # type: ignore[arg-type]
    rows = await ledger_rows(db, 3)
    by_model = {(r.model, r.streamed): r for r in rows}
    assert claude.usage is not None
    for streamed in (False, True):
        row = by_model[("claude-sonnet", streamed)]
        assert (row.prompt_tokens, row.completion_tokens) == (5, 8) and not row.estimated
    argo = by_model[("argo:gpt-4o", False)]
    assert argo.estimated and argo.prompt_tokens > 0 and argo.completion_tokens > 0
    assert upstreams.argo.stats.last_request is not None
    assert upstreams.argo.stats.last_request["body"]["user"] == "alice"
