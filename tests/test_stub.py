"""Tests of the deterministic OpenAI-compatible stub upstream."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionContentPartTextParam, ChatCompletionMessageParam

from lmgate.testing.stub import REPLY_PREFIX, RunningStub, StubOptions, start_stub

# The parts of OpenAI's CreateChatCompletionStreamResponse schema that a chunk must meet.
CHUNK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion.chunk"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "usage": {"type": ["object", "null"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "delta", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "delta": {
                        "type": "object",
                        "properties": {
                            "role": {"enum": ["assistant"]},
                            "content": {"type": ["string", "null"]},
                        },
                    },
                    "logprobs": {"type": "null"},
                    "finish_reason": {"enum": ["stop", "length", None]},
                },
            },
        },
    },
}
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def stub() -> AsyncIterator[RunningStub]:
    running = await start_stub(StubOptions(name="s1"))
    yield running
    await running.close()


@pytest.fixture
async def client(stub: RunningStub) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=stub.url, api_key="x", max_retries=0)
    yield sdk
    await sdk.close()


async def sse_events(url: str, body: dict[str, Any]) -> list[Any]:
    """POST ``body`` and return the decoded SSE data payloads ([DONE] as the string)."""
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-stub-name"] == "s1"
        text = await response.text()
    events = text.split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") for event in events[:-1])
    payloads = [event.removeprefix("data: ") for event in events[:-1]]
    assert payloads[-1] == "[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]] + ["[DONE]"]


async def test_chat_completion(stub: RunningStub, client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": "be brief"}, *HELLO]
    raw = await client.chat.completions.with_raw_response.create(
        model="any-model", messages=messages
    )
    assert raw.headers["x-stub-name"] == "s1"
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-stub-")
    assert completion.model == "any-model"
    assert completion.choices[0].message.content == REPLY_PREFIX + "hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (10, 8)
    assert completion.usage.total_tokens == 18
    assert stub.stats.requests == 1
    assert stub.stats.last_request is not None
    assert stub.stats.last_request["headers"]["Authorization"] == "Bearer x"


async def test_chat_content_parts_and_max_tokens(client: openai.AsyncOpenAI) -> None:
    parts: list[ChatCompletionContentPartTextParam] = [
        {"type": "text", "text": "one"},
        {"type": "text", "text": "two"},
    ]
    completion = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}], max_completion_tokens=3
    )
    assert completion.choices[0].message.content == "This is lmgate's"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 3)


async def test_chat_stream_without_usage(stub: RunningStub) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    events = await sse_events(f"{stub.url}/chat/completions", body)
    chunks = events[:-1]
    for chunk in chunks:
        jsonschema.validate(chunk, CHUNK_SCHEMA)
        assert "usage" not in chunk
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert text == REPLY_PREFIX + "hello there"
    assert len(chunks) == 2 + len(text.split())
    assert stub.stats.completed_streams == 1


async def test_chat_stream_with_usage(stub: RunningStub, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 13
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == REPLY_PREFIX + "hello there"
    body = {"model": "m", "messages": HELLO, "stream": True, "stub": {"usage": True}}
    raw = await sse_events(f"{stub.url}/chat/completions", body)
    assert all(chunk["usage"] is None for chunk in raw[:-2])
    jsonschema.validate(raw[-2], CHUNK_SCHEMA)


@pytest.mark.parametrize(("chunks", "expected"), [(3, 3), (1, 1), (1000, 51)])
async def test_stream_chunk_count(stub: RunningStub, chunks: int, expected: int) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "stub": {"chunks": chunks}}
    events = await sse_events(f"{stub.url}/chat/completions", body)
    pieces = [e["choices"][0]["delta"]["content"] for e in events[1:-2]]
    assert len(pieces) == expected
    assert all(pieces)
    assert "".join(pieces) == REPLY_PREFIX + "hello there"


async def test_completions(stub: RunningStub, client: openai.AsyncOpenAI) -> None:
    completion = await client.completions.create(model="m", prompt=["a b", "c"], max_tokens=7)
    assert [c.text for c in completion.choices] == [REPLY_PREFIX + "a", REPLY_PREFIX + "c"]
    assert [c.finish_reason for c in completion.choices] == ["length", "stop"]
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 14)
    body = {"model": "m", "prompt": "x", "stream": True, "stub": {"content": "a b"}}
    events = await sse_events(f"{stub.url}/completions", body)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a ", "b", ""]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(e["object"] == "text_completion" for e in events[:-1])


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    default = await client.embeddings.create(model="m", input=["a b", "c"])  # base64
    floats = await client.embeddings.create(model="m", input=["a b", "c"], encoding_format="float")
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    first, second = (d.embedding for d in floats.data)
    assert len(first) == 8
    assert first != second
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-6)
    assert floats.usage.prompt_tokens == 3
    tokens = await client.embeddings.create(model="m", input=[[1, 2], [3]], dimensions=4)
    assert [len(d.embedding) for d in tokens.data] == [4, 4]
    assert tokens.usage.total_tokens == 3


async def test_error_controls(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(
            model="m", messages=HELLO, extra_body={"stub": {"status": 429}}
        )
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.message.endswith("stub error 429")
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model="m", input="a", extra_body={"stub": {"status": 503}})
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(
            model="m", messages=HELLO, extra_body={"stub": {"delay": "soon"}}
        )
    assert bad.value.param == "stub.delay"


async def test_invalid_requests(stub: RunningStub) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{stub.url}/chat/completions", data=b"{not json")
        error = (await response.json())["error"]
        assert (response.status, error["type"]) == (400, "invalid_request_error")
        response = await session.post(f"{stub.url}/chat/completions", json={"messages": []})
        error = (await response.json())["error"]
        assert (response.status, error["param"]) == (400, "model")


async def test_strict_models_and_api_key() -> None:
    options = StubOptions(models=["a", "b"], accept_any_model=False, api_key="k")
    running = await start_stub(options)
    sdk = openai.AsyncOpenAI(base_url=running.url, api_key="k", max_retries=0)
    try:
        assert [m.id async for m in sdk.models.list()] == ["a", "b"]
        assert (await sdk.models.retrieve("b")).owned_by == "lmgate-stub"
        with pytest.raises(openai.NotFoundError) as missing:
            await sdk.chat.completions.create(model="c", messages=HELLO)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            await sdk.with_options(api_key="wrong").chat.completions.create(
                model="a", messages=HELLO
            )
    finally:
        await sdk.close()
        await running.close()


async def test_runtime_config_and_fail_status(stub: RunningStub) -> None:
    async with aiohttp.ClientSession() as session:
        base = stub.url.removesuffix("/v1")
        response = await session.post(f"{base}/_stub/config", json={"fail_status": 502})
        assert (await response.json())["fail_status"] == 502
        response = await session.get(f"{stub.url}/models")
        assert response.status == 502
        assert (await session.get(f"{base}/health")).status == 200
        await session.post(f"{base}/_stub/config", json={"fail_status": None})
        assert (await session.get(f"{stub.url}/models")).status == 200
        response = await session.post(f"{base}/_stub/config", json={"delay": -1})
        assert response.status == 400


async def test_echo_stats_and_reset(stub: RunningStub) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{stub.url}/responses", json={"input": "hi"})
        assert await response.json() == {
            "object": "stub.echo",
            "path": "/v1/responses",
            "method": "POST",
            "body": {"input": "hi"},
        }
        base = stub.url.removesuffix("/v1")
        stats = await (await session.get(f"{base}/_stub/stats")).json()
        assert stats["by_path"] == {"/v1/responses": 1}
        assert stats["last_request"]["body"] == {"input": "hi"}
        await session.post(f"{base}/_stub/reset")
    assert (stub.stats.requests, stub.stats.last_request) == (0, None)


async def test_drop_after_breaks_the_sdk(stub: RunningStub, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=HELLO, stream=True, extra_body={"stub": {"drop_after": 2}}
    )
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "This is "
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="m", messages=HELLO, extra_body={"stub": {"drop_after": 0}}
        )
    assert (stub.stats.completed_streams, stub.stats.disconnects) == (0, 0)


async def test_disconnect_is_noticed_promptly(stub: RunningStub) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True, "stub": {"chunk_delay": 2}}
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{stub.url}/chat/completions", json=body)
        while b'"content":"This ' not in await response.content.readline():
            pass
        closed_at = time.monotonic()
        response.close()
        while stub.stats.disconnects == 0 and time.monotonic() - closed_at < 0.5:
            await asyncio.sleep(0.005)
    assert stub.stats.disconnects == 1
    assert stub.stats.disconnect_times[0] - closed_at < 0.1
    assert len(stub.stats.stream_started_times) == 1
    assert stub.stats.completed_streams == 0


def test_cli(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    command = [sys.executable, "-m", "lmgate.testing.stub", "--port", "0", "--name", "cli"]
    process = subprocess.Popen(
        [*command, "--port-file", str(port_file)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        netloc = port_file.read_text()
        assert line == f"stub listening on http://{netloc}"
        assert netloc.startswith("127.0.0.1:")
        asyncio.run(_check_health(f"http://{netloc}/health"))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
        assert process.stdout.read() == ""
    finally:
        process.kill()
        process.wait()


async def _check_health(url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.headers["x-stub-name"] == "cli"
        assert await response.json() == {"status": "ok"}
