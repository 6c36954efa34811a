"""The official anthropic SDK against the entrance's functions, before the gateway has them.

A tiny aiohttp app serves `/v1/messages` with `lmgate.adapters.messages_entrance` only, in
front of an OpenAI upstream: our stub, or a fake one that calls tools.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from lmgate.adapters.messages_entrance import (
    MessagesStreamFromOpenAI,
    anthropic_error_body,
    messages_error_from_openai,
    messages_response_from_openai,
    openai_request_from_messages,
)
from lmgate.api.errors import GatewayError
from lmgate.testing.stub import REPLY_PREFIX, StubOptions, start_stub
from tests.harness import LoopThread
from tests.test_adapters_entrance import WEATHER, chunk, tool_delta

# -- the anthropic SDK against the entrance's functions ------------------------------------------


async def fake_openai(request: web.Request) -> web.StreamResponse:
    """An OpenAI upstream that calls the first tool it is given (streaming or not).

    Without tools it answers `Hello.` (not streamed).
    """
    data = await request.json()
    usage = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    if not data.get("tools"):
        message = {"role": "assistant", "content": "Hello."}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response(
            {"id": "c2", "object": "chat.completion", "choices": [choice], "usage": usage}
        )
    fn = data["tools"][0]["function"]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": fn["name"], "arguments": '{"city": "Oslo"}'},
    }
    if not data.get("stream"):
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
        return web.json_response(
            {"id": "c1", "object": "chat.completion", "choices": [choice], "usage": usage}
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    first = {**call, "function": {"name": fn["name"], "arguments": ""}}
    for piece in (
        chunk(tool_delta(**first)),
        chunk(tool_delta(function={"arguments": '{"city": '})),
        chunk(tool_delta(function={"arguments": '"Oslo"}'})),
        chunk({}, "tool_calls"),
        b"data: " + orjson.dumps({"id": "c1", "choices": [], "usage": usage}) + b"\n\n",
        b"data: [DONE]\n\n",
    ):
        await response.write(piece)
    return response


def entrance_app(upstream: str | None) -> web.Application:
    """`/v1/messages` in front of an OpenAI upstream (None: the fake one of the same app)."""

    async def messages(request: web.Request) -> web.StreamResponse:
        data = await request.json()
        try:
            body = openai_request_from_messages(data)
        except GatewayError as e:
            return web.Response(
                status=e.status,
                body=anthropic_error_body(e.status, e.message),
                content_type="application/json",
            )
        base = f"http://{request.host}/fake"
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{upstream or base}/chat/completions", json=body) as up,
        ):
            if up.status >= 400:
                status, err = messages_error_from_openai(up.status, await up.read())
                return web.Response(status=status, body=err, content_type="application/json")
            if not body.get("stream"):
                out = messages_response_from_openai(await up.read(), data["model"])
                return web.Response(body=out, content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            conv = MessagesStreamFromOpenAI(data["model"])
            async for piece in up.content.iter_any():
                await response.write(conv.feed(piece))
            await response.write(conv.finish())
            return response

    app = web.Application()
    app.add_routes(
        [web.post("/v1/messages", messages), web.post("/fake/chat/completions", fake_openai)]
    )
    return app


@pytest.fixture
def sdk(loop_thread: LoopThread) -> Iterator[anthropic.Anthropic]:
    async def start() -> tuple[Any, web.AppRunner]:
        stub = await start_stub(StubOptions())
        runner = web.AppRunner(entrance_app(stub.url))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return stub, runner

    stub, runner = loop_thread.run(start())
    port = runner.addresses[0][1]
    client = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="unused", max_retries=0
    )
    client.stub = stub  # type: ignore[attr-defined]
    yield client
    loop_thread.run(runner.cleanup())
    loop_thread.run(stub.close())


def test_sdk_create_and_stream(sdk: anthropic.Anthropic) -> None:
    message = sdk.messages.create(
        model="m1",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY_PREFIX + "hello there"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    with sdk.messages.stream(
        model="m1",
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY_PREFIX + "hello there"
    assert (
        final.usage.input_tokens == message.usage.input_tokens and final.stop_reason == "end_turn"
    )


def test_sdk_errors(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.create(
            model="m1",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "text", "media_type": "text/plain", "data": "x"},
                        }
                    ],
                }
            ],
        )
    sdk.stub.options.fail_status = 429  # type: ignore[attr-defined]
    with pytest.raises(anthropic.RateLimitError) as e:
        sdk.messages.create(model="m1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "stub error 429"},
    }


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_tools_through_an_openai_model(loop_thread: LoopThread, stream: bool) -> None:
    async def start() -> web.AppRunner:
        runner = web.AppRunner(entrance_app(None))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    app_runner = loop_thread.run(start())
    port = app_runner.addresses[0][1]
    try:
        client = anthropic.Anthropic(
            base_url=f"http://127.0.0.1:{port}", api_key="x", max_retries=0
        )
        params: dict[str, Any] = {
            "model": "vllm-model",
            "max_tokens": 100,
            "tools": [WEATHER],
            "messages": [{"role": "user", "content": "weather in Oslo?"}],
        }
        if stream:
            with client.messages.stream(**params) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(**params)
        (block,) = message.content
        assert block.type == "tool_use" and block.name == "get_weather"
        assert block.input == {"city": "Oslo"}
        assert message.stop_reason == "tool_use"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (20, 5)
    finally:
        loop_thread.run(app_runner.cleanup())
