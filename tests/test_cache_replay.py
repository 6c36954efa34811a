"""Streams and complete answers, both ways: a stored answer replayed as OpenAI's SSE (checked
against OpenAI's schema), and a stream (the project's stub's, and hand-written ones with tool
calls and logprobs) rebuilt into the complete answer that is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from lmgate.cache.assemble import assemble
from lmgate.cache.keys import CHAT, COMPLETIONS
from lmgate.cache.replay import stream_bytes
from lmgate.testing.stub import RunningStub, StubOptions, start_stub
from tests.infra.openapi import validate

MESSAGES = [{"role": "user", "content": "one two three four five"}]

TOOL_ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-x",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "time", "arguments": "{}"},
                    },
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": "Héllo \u2603 world", "refusal": None},
            "logprobs": {
                "content": [
                    {"token": "Héllo", "logprob": -0.1, "bytes": [72], "top_logprobs": []},
                    {"token": " world", "logprob": -0.2, "bytes": [32], "top_logprobs": []},
                ],
                "refusal": None,
            },
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
}


def events(sse: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE stream, checking that it ends with [DONE]."""
    blocks = [b for b in sse.split(b"\n\n") if b]
    assert blocks[-1] == b"data: [DONE]"
    assert all(b.startswith(b"data: ") for b in blocks)
    return [orjson.loads(b[6:]) for b in blocks[:-1]]


def without_ids(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "id"}


@pytest.fixture
async def stub() -> AsyncIterator[RunningStub]:
    running = await start_stub(StubOptions())
    yield running
    await running.close()


async def post(stub: RunningStub, path: str, body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stub.url}{path}", json=body) as r,
    ):
        assert r.status == 200
        return await r.read()


# -- replay -------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_replay_is_a_valid_openai_stream(include_usage: bool) -> None:
    chunks = events(stream_bytes(CHAT, TOOL_ANSWER, include_usage))
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["id"] == "chatcmpl-1" and chunk["system_fingerprint"] == "fp_1"
        assert ("usage" in chunk) is include_usage
    first = chunks[0]["choices"][0]
    assert first["delta"] == {"role": "assistant", "content": None}
    assert first["finish_reason"] is None
    finishes = [
        (c["choices"][0]["index"], c["choices"][0]["finish_reason"])
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"] is not None
    ]
    assert finishes == [(0, "tool_calls"), (1, "stop")]
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == TOOL_ANSWER["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])


def test_replayed_content_concatenates_to_the_stored_message() -> None:
    chunks = events(stream_bytes(CHAT, TOOL_ANSWER, False))
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in chunks
        if c["choices"][0]["index"] == 1
    )
    assert text == TOOL_ANSWER["choices"][1]["message"]["content"]


@pytest.mark.parametrize("include_usage", [False, True])
def test_replay_then_rebuild_gives_the_stored_answer(include_usage: bool) -> None:
    rebuilt = assemble(CHAT, stream_bytes(CHAT, TOOL_ANSWER, include_usage))
    expected = orjson.loads(orjson.dumps(TOOL_ANSWER))
    if not include_usage:
        del expected["usage"]
    assert rebuilt == expected


async def test_stub_answer_replayed_like_the_stub_streams_it(stub: RunningStub) -> None:
    """The stub's complete answer, replayed, carries what the stub's own stream carries."""
    body = {"model": "m", "messages": MESSAGES, "temperature": 0}
    answer = orjson.loads(await post(stub, "/chat/completions", body))
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    streamed = await post(stub, "/chat/completions", stream)
    replayed = stream_bytes(CHAT, answer, include_usage=True)
    for chunk in events(replayed):
        validate("CreateChatCompletionStreamResponse", chunk)
    assert without_ids(assemble(CHAT, replayed) or {}) == without_ids(
        assemble(CHAT, streamed) or {}
    )


async def test_completions_replay(stub: RunningStub) -> None:
    body = {"model": "m", "prompt": ["a b c", "d e"], "temperature": 0}
    answer = orjson.loads(await post(stub, "/completions", body))
    chunks = events(stream_bytes(COMPLETIONS, answer, include_usage=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    for i, choice in enumerate(answer["choices"]):
        text = "".join(
            c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i
        )
        assert text == choice["text"]
    assert chunks[-1]["usage"] == answer["usage"]


# -- rebuilding a stream ------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"stream_options": {"include_usage": True}}])
@pytest.mark.parametrize("n_chunks", [None, 1, 3])
async def test_rebuilt_stub_stream_equals_its_complete_answer(
    stub: RunningStub, options: dict[str, Any], n_chunks: int | None
) -> None:
    body = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 4}
    if n_chunks is not None:
        body["stub"] = {"chunks": n_chunks}
    answer = orjson.loads(await post(stub, "/chat/completions", body))
    rebuilt = assemble(
        CHAT, await post(stub, "/chat/completions", {**body, "stream": True, **options})
    )
    assert rebuilt is not None
    validate("CreateChatCompletionResponse", rebuilt)
    if not options:
        del answer["usage"]
    assert without_ids(rebuilt) == without_ids(answer)
    assert rebuilt["choices"][0]["finish_reason"] == "length"


async def test_rebuilt_completions_stream(stub: RunningStub) -> None:
    body = {"model": "m", "prompt": ["a b c", "d e"], "temperature": 0}
    answer = orjson.loads(await post(stub, "/completions", body))
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    rebuilt = assemble(COMPLETIONS, await post(stub, "/completions", stream))
    assert rebuilt is not None
    validate("CreateCompletionResponse", rebuilt)
    assert without_ids(rebuilt) == without_ids(answer)


def test_rebuilt_tool_calls_arriving_in_pieces() -> None:
    """As OpenAI streams tool calls: id and name first, then the arguments in pieces; CRLF
    line ends and a comment line on the way."""
    meta = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**meta, "choices": [choice]}) + b"\r\n\r\n"

    call = {"index": 0, "id": "call_a", "type": "function"}
    sse = b"".join(
        [
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{**call, "function": {"name": "weather", "arguments": ""}}],
                }
            ),
            b": keep-alive\r\n\r\n",
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]}),
            chunk({}, "tool_calls"),
            b"data: [DONE]\r\n\r\n",
        ]
    )
    rebuilt = assemble(CHAT, sse)
    assert rebuilt is not None
    validate("CreateChatCompletionResponse", rebuilt)
    assert rebuilt["choices"][0]["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    }


@pytest.mark.parametrize(
    "tail",
    [
        b"",  # no [DONE]: the stream was cut
        b'data: {"error": {"message": "broke", "type": "upstream_error"}}\n\ndata: [DONE]\n\n',
        b"data: {not json\n\ndata: [DONE]\n\n",
    ],
)
def test_unfinished_or_failed_streams_are_not_rebuilt(tail: bytes) -> None:
    sse = stream_bytes(CHAT, TOOL_ANSWER, False).removesuffix(b"data: [DONE]\n\n")
    assert assemble(CHAT, sse + tail) is None


def test_stream_without_finish_reason_is_not_rebuilt() -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    assert assemble(CHAT, b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n") is None
