"""The Anthropic adapter: OpenAI chat to the Messages API and back, streams included."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgate.adapters import AnthropicAdapter, Context, create_adapter
from lmgate.adapters.anthropic_stream import MessagesUsage, usage_from_message
from lmgate.api.errors import GatewayError
from tests.infra.openapi import validate
from tests.test_adapters_argo import TOOLS, sse_objects, validate_chunk

ADAPTER = create_adapter("anthropic", {"default_max_tokens": 1000})
PNG = "iVBORw0KGgo="


def build(data: dict[str, Any], kind: str = "chat") -> dict[str, Any]:
    return orjson.loads(ADAPTER.build(kind, data, "claude-sonnet-4-20250514", None).body)


def ctx(kind: str = "chat", **data: Any) -> Context:
    return Context.for_request(kind, data, "claude-sonnet", "t1", created=1)


def ev(name: str, **payload: Any) -> bytes:
    return (
        b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **payload}) + b"\n\n"
    )


USAGE = {"input_tokens": 10, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 2}
TEXT_STREAM = b"".join(
    [
        ev("message_start", message={"id": "msg_1", "usage": {**USAGE, "output_tokens": 1}}),
        ev("ping"),
        ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hél"}),
        ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "lo ✓"}),
        ev("content_block_stop", index=0),
        ev(
            "content_block_start",
            index=1,
            content_block={"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        ),
        ev(
            "content_block_delta",
            index=1,
            delta={"type": "input_json_delta", "partial_json": '{"ci'},
        ),
        ev(
            "content_block_delta",
            index=1,
            delta={"type": "input_json_delta", "partial_json": 'ty": "Oslo"}'},
        ),
        ev("content_block_stop", index=1),
        ev("message_delta", delta={"stop_reason": "tool_use"}, usage={"output_tokens": 7}),
        ev("message_stop"),
    ]
).replace(b"\n", b"\r\n")


def test_auth_headers() -> None:
    assert ADAPTER.auth_headers("sk-ant") == {
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant",
    }
    assert "x-api-key" not in ADAPTER.auth_headers("")


CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
}
OPENAI_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                {"type": "image_url", "image_url": {"url": "https://x.org/a.jpg"}},
            ],
        },
        {"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ],
    "tools": TOOLS,
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "stop": "END",
    "temperature": 1.5,
    "top_p": 0.9,
    "user": "u-1",
    "stream": True,
    "stream_options": {"include_usage": True},
}


def test_request_conversion() -> None:
    data = OPENAI_REQUEST
    sent = build(data)
    assert sent["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use metric."},
    ]
    user, assistant, results = sent["messages"]
    assert user["content"][1] == {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    assert user["content"][2]["source"] == {"type": "url", "url": "https://x.org/a.jpg"}
    assert assistant["content"][1] == {
        "type": "tool_use",
        "id": "c1",
        "name": "get_weather",
        "input": {"city": "Oslo"},
    }
    assert results == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
            {"type": "text", "text": "thanks"},
        ],
    }
    assert sent["tools"][0]["input_schema"] == TOOLS[0]["function"]["parameters"]
    assert sent["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
        "disable_parallel_tool_use": True,
    }
    assert (sent["stop_sequences"], sent["temperature"], sent["max_tokens"]) == (["END"], 1.0, 1000)
    assert sent["metadata"] == {"user_id": "u-1"} and sent["stream"] is True
    assert "stream_options" not in sent


@pytest.mark.parametrize(
    ("choice", "mapped"),
    [("auto", {"type": "auto"}), ("required", {"type": "any"}), ("none", {"type": "none"})],
)
def test_tool_choice(choice: str, mapped: dict[str, Any]) -> None:
    data = {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": choice}
    assert build(data)["tool_choice"] == mapped


def test_max_tokens_and_completions() -> None:
    assert (
        build({"messages": [{"role": "user", "content": "x"}], "max_tokens": 7})["max_tokens"] == 7
    )
    assert build({"prompt": "Say hi"}, "completions")["messages"] == [
        {"role": "user", "content": "Say hi"}
    ]


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("chat", {"messages": [{"role": "user", "content": "x"}], "n": 3}),
        (
            "chat",
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
        ),
        ("chat", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
        (
            "chat",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                    }
                ]
            },
        ),
        (
            "chat",
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{"}}]}]},
        ),
        ("embeddings", {"input": "x"}),
    ],
)
def test_unsupported(kind: str, data: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as e:
        build(data, kind)
    assert e.value.status == 400


def test_response_with_text_tools_and_cache_usage() -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "usage": {**USAGE, "output_tokens": 9},
    }
    status, out = ADAPTER.response("chat", 200, orjson.dumps(message), ctx())
    obj = orjson.loads(out)
    validate("CreateChatCompletionResponse", obj)
    choice = obj["choices"][0]
    assert (status, choice["finish_reason"], choice["message"]["content"]) == (
        200,
        "tool_calls",
        "Checking.",
    )
    assert choice["message"]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    }
    assert obj["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 9,
        "total_tokens": 25,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert usage_from_message(orjson.dumps(message)) == obj["usage"]


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons(reason: str, finish: str) -> None:
    message = {
        "content": [{"type": "text", "text": "x"}],
        "stop_reason": reason,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    for kind, schema in (
        ("chat", "CreateChatCompletionResponse"),
        ("completions", "CreateCompletionResponse"),
    ):
        obj = orjson.loads(ADAPTER.response(kind, 200, orjson.dumps(message), ctx(kind))[1])
        validate(schema, obj)
        assert obj["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize(
    ("status", "etype", "expected"),
    [
        (400, "invalid_request_error", (400, "invalid_request_error", None)),
        (401, "authentication_error", (401, "authentication_error", "invalid_api_key")),
        (403, "permission_error", (403, "permission_error", None)),
        (404, "not_found_error", (404, "invalid_request_error", "model_not_found")),
        (413, "request_too_large", (413, "invalid_request_error", "request_too_large")),
        (429, "rate_limit_error", (429, "rate_limit_error", "rate_limit_exceeded")),
        (500, "api_error", (500, "server_error", None)),
        (529, "overloaded_error", (503, "server_error", "overloaded")),
    ],
)
def test_errors(status: int, etype: str, expected: tuple[int, str, str | None]) -> None:
    answer = orjson.dumps({"type": "error", "error": {"type": etype, "message": "boom"}})
    got, out = ADAPTER.response("chat", status, answer, ctx())
    obj = orjson.loads(out)
    validate("ErrorResponse", obj)
    assert (got, obj["error"]["type"], obj["error"]["code"]) == expected
    assert obj["error"]["message"] == "boom"


def test_error_without_envelope() -> None:
    got, out = ADAPTER.response("chat", 502, b"Bad Gateway", ctx())
    assert got == 502 and orjson.loads(out)["error"]["message"] == "Bad Gateway"


def run(raw: bytes, cuts: list[int], context: Context) -> tuple[Any, bytes]:
    conv = ADAPTER.stream(context.kind, context)
    out, last = b"", 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        out += conv.feed(raw[last:cut])
        last = cut
    return conv, out + conv.finish()


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(TEXT_STREAM)), max_size=10))
def test_stream_at_any_split(cuts: list[int]) -> None:
    conv, out = run(TEXT_STREAM, cuts, ctx(stream=True, stream_options={"include_usage": True}))
    assert conv.complete and conv.error is None
    objs = sse_objects(out)
    for obj in objs:
        validate_chunk("chat", obj)
    deltas = [c["delta"] for o in objs for c in o["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content") or "" for d in deltas) == "Héllo ✓"
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert calls[0]["id"] == "toolu_1" and calls[0]["function"]["name"] == "get_weather"
    assert "".join(c["function"].get("arguments", "") for c in calls) == '{"city": "Oslo"}'
    assert objs[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 4
    }
    assert objs[-1]["usage"]["completion_tokens"] == 7


def test_stream_without_usage_request_and_as_completions() -> None:
    _, out = run(TEXT_STREAM, [], ctx(stream=True))
    objs = sse_objects(out)
    assert all("usage" not in o for o in objs)
    _, out = run(TEXT_STREAM, [], ctx("completions", stream=True))
    objs = sse_objects(out)
    for obj in objs:
        validate_chunk("completions", obj)
    assert objs[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_error_and_broken_stream() -> None:
    raw = TEXT_STREAM[: TEXT_STREAM.index(b"event: content_block_stop")]
    error = ev("error", error={"type": "overloaded_error", "message": "Overloaded"})
    conv, out = run(raw + error, [], ctx(stream=True))
    assert not conv.complete and conv.error is not None
    last = orjson.loads(out.split(b"\n\n")[-2].removeprefix(b"data: "))
    validate("ErrorResponse", last)
    assert last["error"]["code"] == "overloaded" and b"[DONE]" not in out
    conv, out = run(raw, [], ctx(stream=True))
    assert not conv.complete and conv.error is None and b"[DONE]" not in out


@settings(max_examples=100)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(TEXT_STREAM)), max_size=6))
def test_native_stream_usage(cuts: list[int]) -> None:
    watcher, last = MessagesUsage(), 0
    for cut in [*sorted(set(cuts)), len(TEXT_STREAM)]:
        watcher.feed(TEXT_STREAM[last:cut])
        last = cut
    assert watcher.usage is not None
    assert (watcher.usage["prompt_tokens"], watcher.usage["completion_tokens"]) == (16, 7)


def test_factory_defaults() -> None:
    adapter = create_adapter("anthropic", {"anthropic_version": "2024-01-01"})
    assert isinstance(adapter, AnthropicAdapter)
    assert adapter.auth_headers("")["anthropic-version"] == "2024-01-01"
    with pytest.raises(ValueError, match="unknown provider type"):
        create_adapter("nope")
