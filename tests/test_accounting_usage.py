"""Usage extraction: JSON bodies, and SSE streams cut at every possible place."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgate.accounting.tokenizer import (
    count_messages,
    count_prompt,
    count_tokens,
    estimate_prompt_tokens,
)
from lmgate.accounting.usage import (
    StreamUsage,
    Usage,
    completion_text,
    inject_include_usage,
    splice_include_usage,
    usage_from_body,
    wants_usage,
)
from lmgate.testing.stub import StubOptions, start_stub

PROMPT = "Tell me about the gateway and its ledger, with some words to stream"


async def _fetch(path: str, body: dict[str, object]) -> bytes:
    stub = await start_stub(StubOptions())
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(stub.url + path, json=body) as r,
        ):
            return await r.read()
    finally:
        await stub.close()


def _stream(path: str, **extra: object) -> bytes:
    body: dict[str, object] = {"model": "m", "stream": True, **extra}
    if path == "/chat/completions":
        body["messages"] = [{"role": "user", "content": PROMPT}]
    else:
        body["prompt"] = PROMPT
    return asyncio.run(_fetch(path, body))


@pytest.fixture(scope="module")
def chat_stream() -> bytes:
    return _stream("/chat/completions", stream_options={"include_usage": True})


@pytest.fixture(scope="module")
def completion_stream() -> bytes:
    return _stream("/completions", stream_options={"include_usage": True})


def _without_usage_event(stream: bytes, sep: bytes = b"\n\n") -> bytes:
    events = stream.split(sep)
    kept = [e for e in events if not (b'"choices":[]' in e and b'"usage":{' in e)]
    assert len(kept) == len(events) - 1
    return sep.join(kept)


def _usage_of(stream: bytes) -> Usage:
    for event in stream.split(b"\n\n"):
        if b'"usage":{' in event:
            u = orjson.loads(event[len(b"data: ") :])["usage"]
            return Usage(u["prompt_tokens"], u["completion_tokens"])
    raise AssertionError("no usage event")


def _run(chunks: list[bytes], strip: bool) -> tuple[bytes, StreamUsage]:
    su = StreamUsage(strip=strip)
    out = b"".join(su.feed(c) for c in chunks) + su.flush()
    return out, su


def test_stub_stream_has_usage_and_null_usage_chunks(chat_stream: bytes) -> None:
    assert chat_stream.count(b'"usage":null') >= 3
    assert _usage_of(chat_stream).completion > 5


@pytest.mark.parametrize("name", ["chat_stream", "completion_stream"])
def test_every_single_split_point(name: str, request: pytest.FixtureRequest) -> None:
    stream: bytes = request.getfixturevalue(name)
    expected, usage = _without_usage_event(stream), _usage_of(stream)
    for i in range(len(stream) + 1):
        out, su = _run([stream[:i], stream[i:]], strip=True)
        assert out == expected, i
        assert su.usage == usage, i
        out, su = _run([stream[:i], stream[i:]], strip=False)
        assert out == stream, i
        assert su.usage == usage, i


def test_crlf_separators_every_split(chat_stream: bytes) -> None:
    stream = chat_stream.replace(b"\n\n", b"\r\n\r\n")
    expected = _without_usage_event(stream, b"\r\n\r\n")
    for i in range(len(stream) + 1):
        out, su = _run([stream[:i], stream[i:]], strip=True)
        assert out == expected, i
        assert su.usage == _usage_of(chat_stream)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_chunkings(chat_stream: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(chat_stream)), max_size=40, unique=True)))
    bounds = [0, *cuts, len(chat_stream)]
    chunks = [chat_stream[a:b] for a, b in itertools.pairwise(bounds)]
    out, su = _run(chunks, strip=True)
    assert out == _without_usage_event(chat_stream)
    assert su.usage == _usage_of(chat_stream)


def test_complete_events_are_not_delayed(chat_stream: bytes) -> None:
    events = [e + b"\n\n" for e in chat_stream.split(b"\n\n") if e]
    su = StreamUsage(strip=True)
    head = events[0]
    assert su.feed(head[:10]) == b""
    assert su.feed(head[10:] + events[1][:5]) == head
    assert su.feed(events[1][5:]) == events[1]


def test_usage_with_choices_is_forwarded() -> None:
    event = b'data: {"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":3,'
    event += b'"completion_tokens":4,"prompt_tokens_details":{"cached_tokens":2}}}\n\n'
    stream = event + b"data: [DONE]\n\n"
    out, su = _run([stream], strip=True)
    assert out == stream
    assert su.usage == Usage(3, 4, cached=2)


def test_unterminated_last_event() -> None:
    stream = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}'
    out, su = _run([stream[:20], stream[20:]], strip=True)
    assert out == b""
    assert su.usage == Usage(1, 2)
    out, su = _run([b"data: [DONE]"], strip=True)
    assert out == b"data: [DONE]"


def test_quoted_usage_in_content_is_ignored() -> None:
    text = 'the "usage":{} key'
    event = b"data: " + orjson.dumps({"choices": [{"delta": {"content": text}}]}) + b"\n\n"
    out, su = _run([event], strip=True)
    assert out == event
    assert su.usage is None


def test_responses_api_stream_usage() -> None:
    payload = {
        "type": "response.completed",
        "response": {
            "usage": {
                "input_tokens": 10,
                "output_tokens": 20,
                "input_tokens_details": {"cached_tokens": 4},
                "output_tokens_details": {"reasoning_tokens": 7},
            }
        },
    }
    event = b"event: response.completed\ndata: " + orjson.dumps(payload) + b"\n\n"
    out, su = _run([event], strip=True)
    assert out == event
    assert su.usage == Usage(10, 20, 4, 7)


def test_estimate_without_usage() -> None:
    stream = _stream("/chat/completions")
    assert b'"usage"' not in stream
    out, su = _run([stream], strip=True)
    assert out == stream and su.usage is None
    text = "This is lmgate's stub worker answering: " + PROMPT
    assert su.estimate_completion_tokens("gpt-4o") == count_tokens(text)


def test_usage_from_bodies() -> None:
    chat = {
        "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": "hi there"}}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 20},
        },
    }
    body = orjson.dumps(chat)
    assert usage_from_body(body) == Usage(12, 30, 8, 20)
    assert completion_text(body) == "hi there"
    embeddings = {"object": "list", "usage": {"prompt_tokens": 5, "total_tokens": 5}}
    assert usage_from_body(orjson.dumps(embeddings)) == Usage(5, 0)
    responses = {"object": "response", "usage": {"input_tokens": 3, "output_tokens": 9}}
    assert usage_from_body(orjson.dumps(responses)) == Usage(3, 9)
    assert usage_from_body(b'{"choices": []}') is None
    assert usage_from_body(b'{"usage": null}') is None
    assert usage_from_body(b'"usage" but not json') is None


def test_inject_include_usage() -> None:
    data: dict[str, object] = {"model": "m", "stream": True}
    assert not wants_usage(data)
    assert inject_include_usage(data)
    assert data["stream_options"] == {"include_usage": True}
    assert not inject_include_usage(data)  # the client (now) asks for it
    assert not inject_include_usage({"model": "m"})
    other: dict[str, object] = {"stream": True, "stream_options": {"include_usage": False, "x": 1}}
    assert inject_include_usage(other)
    assert other["stream_options"] == {"include_usage": True, "x": 1}


def test_splice_include_usage() -> None:
    raw = b'{"model": "m", "stream": true, "messages": []}'
    spliced = splice_include_usage(raw)
    assert spliced is not None
    data = orjson.loads(raw)
    inject_include_usage(data)
    assert orjson.loads(spliced) == data
    assert splice_include_usage(b'{"stream": true, "stream_options": {}}') is None
    assert splice_include_usage(b"{}") is None


def test_tokenizer_counts() -> None:
    assert count_tokens("") == 0
    assert count_tokens("Hello world") == 2  # o200k_base
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Hello world"}], "name": "bob"},
    ]
    total = count_messages(messages)
    assert total == 3 + 3 + (4 + 1) + 3 + (2 + 1 + 1) + 1
    assert count_prompt({"messages": messages}) == total
    assert count_prompt({"input": ["Hello world", [1, 2, 3]]}) == 5
    assert count_prompt({"prompt": [1, 2, 3, 4]}) == 4
    assert estimate_prompt_tokens(3000) >= count_tokens("word " * 600)


def test_heuristic_fallback_is_close() -> None:
    from lmgate.accounting.tokenizer import _heuristic

    text = Path("README.md").read_text("utf-8")
    exact = count_tokens(text)
    assert abs(_heuristic(text) - exact) / exact < 0.15
