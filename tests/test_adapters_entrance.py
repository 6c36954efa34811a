"""The Anthropic-compatible entrance: Messages requests served by an OpenAI-compatible model.

Besides the pure conversions, the official anthropic SDK talks to a tiny aiohttp app that
uses the entrance's functions in front of an OpenAI upstream (our stub, or a fake one with
tool calls): the format is proven before the gateway serves `/v1/messages` itself.
"""

from __future__ import annotations

from typing import Any

import anthropic
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgate.adapters.messages_entrance import (
    MessagesStreamFromOpenAI,
    anthropic_error_body,
    messages_error_from_openai,
    messages_response_from_openai,
    openai_request_from_messages,
)
from lmgate.api.errors import GatewayError
from tests.infra.openapi import validate

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PNG = "iVBORw0KGgo="


MESSAGES_REQUEST: dict[str, Any] = {
    "model": "m1",
    "max_tokens": 50,
    "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Metric."}],
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "image", "source": {"type": "url", "url": "https://x.org/a.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ],
    "tools": [WEATHER],
    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    "stop_sequences": ["END"],
    "temperature": 0.5,
    "metadata": {"user_id": "u-1"},
    "stream": True,
}


def test_request_conversion() -> None:
    data = MESSAGES_REQUEST
    out = openai_request_from_messages(data)
    system, user, assistant, tool, thanks = out["messages"]
    assert system == {"role": "system", "content": "Be brief.\n\nMetric."}
    assert user["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{PNG}"},
    }
    assert user["content"][2]["image_url"]["url"] == "https://x.org/a.jpg"
    assert assistant["content"] == "Checking."
    assert assistant["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    }
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert thanks == {"role": "user", "content": "thanks"}
    assert out["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert (out["tool_choice"], out["parallel_tool_calls"]) == ("required", False)
    assert (out["stop"], out["max_tokens"], out["user"], out["temperature"]) == (
        ["END"],
        50,
        "u-1",
        0.5,
    )
    assert out["stream_options"] == {"include_usage": True}
    validate("CreateChatCompletionRequest", out)


@pytest.mark.parametrize(
    "data",
    [
        {"model": "m", "messages": []},
        {"model": "m", "max_tokens": 1, "messages": [{"role": "system", "content": "x"}]},
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "document"}]}],
        },
        {
            "model": "m",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search_20250305", "name": "w"}],
        },
    ],
)
def test_invalid_requests(data: dict[str, Any]) -> None:
    with pytest.raises(GatewayError) as e:
        openai_request_from_messages(data)
    assert e.value.status == 400


def test_response_conversion() -> None:
    completion = {
        "id": "chatcmpl-1",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 3,
            "total_tokens": 13,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }
    message = orjson.loads(messages_response_from_openai(orjson.dumps(completion), "m1"))
    assert message["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
    ]
    assert message["stop_reason"] == "tool_use" and message["model"] == "m1"
    assert message["usage"] == {
        "input_tokens": 6,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    assert anthropic.types.Message.model_validate(message).usage.cache_read_input_tokens == 4
    vllm_stop = {
        "choices": [{"finish_reason": "stop", "stop_reason": "END", "message": {"content": "x"}}]
    }
    message = orjson.loads(messages_response_from_openai(orjson.dumps(vllm_stop), "m1"))
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "END")


def test_errors() -> None:
    status, body = messages_error_from_openai(429, b'{"error": {"message": "slow down"}}')
    assert status == 429
    assert orjson.loads(body) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
    assert orjson.loads(anthropic_error_body(529, "busy"))["error"]["type"] == "overloaded_error"
    assert orjson.loads(messages_error_from_openai(502, b"oops")[1])["error"]["type"] == "api_error"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "c1", "choices": [choice], **extra}) + b"\n\n"


def tool_delta(**fields: Any) -> dict[str, Any]:
    return {"tool_calls": [{"index": 0, **fields}]}


OPENAI_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hé"}),
        chunk({"content": "llo"}),
        chunk(tool_delta(id="call_1", type="function", function={"name": "f", "arguments": ""})),
        chunk(tool_delta(function={"arguments": '{"a"'})),
        chunk(tool_delta(function={"arguments": ": 1}"})),
        chunk({}, "tool_calls"),
        b"data: "
        + orjson.dumps(
            {"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
        )
        + b"\n\n",
        b"data: [DONE]\n\n",
    ]
)


def anthropic_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block:
            name_line, data_line = block.split("\n")
            out.append(
                (name_line.removeprefix("event: "), orjson.loads(data_line.removeprefix("data: ")))
            )
    return out


@settings(max_examples=200)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=10))
def test_stream_at_any_split(cuts: list[int]) -> None:
    conv, out, last = MessagesStreamFromOpenAI("m1"), b"", 0
    for cut in [*sorted(set(cuts)), len(OPENAI_STREAM)]:
        out += conv.feed(OPENAI_STREAM[last:cut])
        last = cut
    out += conv.finish()
    assert conv.complete
    events = anthropic_events(out)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == [
        "message_delta",
        "message_stop",
    ]
    assert names.count("content_block_start") == names.count("content_block_stop") == 2
    for name, payload in events:
        assert payload["type"] == name
    text = "".join(p["delta"].get("text", "") for n, p in events if n == "content_block_delta")
    args = "".join(
        p["delta"].get("partial_json", "") for n, p in events if n == "content_block_delta"
    )
    assert (text, args) == ("Héllo", '{"a": 1}')
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["input_tokens"] == 5


def test_stream_error_and_break() -> None:
    conv = MessagesStreamFromOpenAI("m1")
    out = (
        conv.feed(chunk({"content": "x"}) + b'data: {"error": {"message": "boom"}}\n\n')
        + conv.finish()
    )
    assert anthropic_events(out)[-1] == (
        "error",
        {"type": "error", "error": {"type": "api_error", "message": "boom"}},
    )
    broken = MessagesStreamFromOpenAI("m1")
    out = broken.feed(chunk({"content": "x"})) + broken.finish()
    assert not broken.complete and b"message_stop" not in out
