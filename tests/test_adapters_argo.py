"""The ARGO adapter and the tool-call prompt convention, as pure conversions."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgate.adapters import ArgoAdapter, Context, create_adapter, toolprompt
from lmgate.adapters.argo import ArgoOptions, status_answer
from lmgate.api.errors import GatewayError
from tests.infra.openapi import validate

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ARGO = create_adapter("argo", {"argo_user": "alice"})


def body(call: Any) -> dict[str, Any]:
    return orjson.loads(call.body)


def ctx(kind: str = "chat", **data: Any) -> Context:
    return Context.for_request(kind, data, "argo:gpt-4o", "t1", created=1)


def sse_objects(raw: bytes) -> list[Any]:
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    return [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]


def validate_chunk(kind: str, obj: dict[str, Any]) -> None:
    if kind == "chat":
        validate("CreateChatCompletionStreamResponse", obj)
        return
    # The spec gives completion chunks no null finish_reason, though OpenAI streams send one.
    choices = [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in obj["choices"]]
    validate("CreateCompletionResponse", {**obj, "choices": choices})


def test_build_chat_maps_model_user_and_sampling() -> None:
    data = {
        "model": "argo:gpt-4o",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_completion_tokens": 5,
        "stop": ["x"],
        "stream": True,
    }
    call = ARGO.build("chat", data, "argo:gpt-4o", "bob")
    assert (call.method, call.suffix, call.stream) == ("POST", "/resource/streamchat/", True)
    sent = body(call)
    assert sent == {
        "user": "alice",
        "model": "gpt4o",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["x"],
        "max_tokens": 5,
    }
    assert ARGO.build("chat", {**data, "stream": False}, "gpt4o", None).suffix == "/resource/chat/"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("argo:gpt-3.5-turbo", "gpt35"),
        ("argo:gpt-4", "gpt4"),
        ("argo:gpt-4-turbo-preview", "gpt4turbo"),
        ("argo:gpt-o1-mini", "gpto1mini"),
        ("argo:gpt-o3-mini", "gpto3mini"),
        ("argo:text-embedding-3-small", "v3small"),
        ("gpt4o", "gpt4o"),
        ("custom", "renamed"),
    ],
)
def test_model_names(name: str, expected: str) -> None:
    adapter = create_adapter("argo", {"argo_user": "a", "argo_models": {"custom": "renamed"}})
    assert isinstance(adapter, ArgoAdapter)
    assert adapter.argo_model(name) == expected


def test_user_per_key_and_missing_user() -> None:
    per_key = ArgoAdapter(ArgoOptions(user="shared", user_per_key=True))
    data = {"messages": [{"role": "user", "content": "hi"}]}
    assert body(per_key.build("chat", data, "gpt4o", "bob"))["user"] == "bob"
    assert body(per_key.build("chat", data, "gpt4o", None))["user"] == "shared"
    with pytest.raises(GatewayError) as e:
        ArgoAdapter().build("chat", data, "gpt4o", None)
    assert e.value.status == 500


def test_system_folded_for_models_without_one() -> None:
    data = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ]
    }
    folded = body(ARGO.build("chat", data, "argo:gpt-o1-mini", None))["messages"]
    assert folded[0] == {"role": "user", "content": "Be brief.\n\nhi"}
    assert [m["role"] for m in folded] == ["user", "assistant", "user"]
    kept = body(ARGO.build("chat", data, "argo:gpt-4o", None))["messages"]
    assert kept[0] == {"role": "system", "content": "Be brief."}


def test_tools_in_the_prompt_and_history() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    data = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
    }
    messages = body(ARGO.build("chat", data, "gpt4o", None))["messages"]
    assert messages[0]["role"] == "system"
    assert "get_weather" in messages[0]["content"] and "must call" in messages[0]["content"]
    assert "<tool_call>" in messages[2]["content"] and messages[2]["role"] == "assistant"
    assert messages[3] == {
        "role": "user",
        "content": '<tool_result tool_call_id="c1">\nsunny\n</tool_result>',
    }
    none = body(ARGO.build("chat", {**data, "tool_choice": "none"}, "gpt4o", None))["messages"]
    assert none[0]["role"] == "user"


@pytest.mark.parametrize(
    ("kind", "data", "param"),
    [
        ("chat", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ("chat", {"messages": []}, "messages"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "x"}]},
            "tools",
        ),
        ("completions", {"prompt": ["a", "b"]}, "prompt"),
        ("embeddings", {"input": [[1, 2]]}, "input"),
        ("embeddings", {"input": "a", "dimensions": 3}, "dimensions"),
    ],
)
def test_unsupported_requests(kind: str, data: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as e:
        ARGO.build(kind, data, "gpt4o", None)
    assert (e.value.status, e.value.param) == (400, param)


def test_chat_response() -> None:
    status, out = ARGO.response("chat", 200, b'{"response": "Hello"}', ctx())
    obj = orjson.loads(out)
    validate("CreateChatCompletionResponse", obj)
    assert status == 200 and obj["choices"][0]["message"]["content"] == "Hello"
    assert "usage" not in obj  # ARGO counts nothing: the gateway estimates


def test_chat_response_with_tool_call() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
    answer = orjson.dumps({"response": text})
    _, out = ARGO.response("chat", 200, answer, ctx(tools=TOOLS))
    obj = orjson.loads(out)
    validate("CreateChatCompletionResponse", obj)
    choice = obj["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    _, plain = ARGO.response("chat", 200, answer, ctx(tools=TOOLS, tool_choice="none"))
    assert "tool_calls" not in orjson.loads(plain)["choices"][0]["message"]


def test_completions_and_embeddings() -> None:
    _, out = ARGO.response("completions", 200, b'{"response": "done"}', ctx("completions"))
    validate("CreateCompletionResponse", orjson.loads(out))
    vectors = {"embedding": [[0.5, 0.25], [1.0, 0.0]]}
    emb_ctx = ctx("embeddings", input=["hello world", "x"])
    _, out = ARGO.response("embeddings", 200, orjson.dumps(vectors), emb_ctx)
    obj = orjson.loads(out)
    validate("CreateEmbeddingResponse", obj)
    assert obj["data"][1]["embedding"] == [1.0, 0.0] and obj["usage"]["prompt_tokens"] == 3
    b64_ctx = ctx("embeddings", input=["a", "b"], encoding_format="base64")
    _, out = ARGO.response("embeddings", 200, orjson.dumps(vectors), b64_ctx)
    packed = base64.b64decode(orjson.loads(out)["data"][0]["embedding"])
    assert struct.unpack("<2f", packed) == (0.5, 0.25)


@pytest.mark.parametrize(
    ("status", "answer", "message"),
    [
        (400, b'{"detail": "Missing user"}', "ARGO: Missing user"),
        (422, b'{"detail": [{"msg": "bad"}]}', 'ARGO: [{"msg":"bad"}]'),
        (503, b"Service Unavailable", "ARGO: Service Unavailable"),
        (500, b"", "ARGO: status 500"),
    ],
)
def test_errors(status: int, answer: bytes, message: str) -> None:
    got, out = ARGO.response("chat", status, answer, ctx())
    obj = orjson.loads(out)
    validate("ErrorResponse", obj)
    assert got == status and obj["error"]["message"] == message


def test_bad_success_answer() -> None:
    status, out = ARGO.response("chat", 200, b"<html>", ctx())
    assert status == 502
    validate("ErrorResponse", orjson.loads(out))


def _stream(kind: str, context: Context, raw: bytes, cuts: list[int]) -> list[Any]:
    conv = ARGO.stream(kind, context)
    out, last = b"", 0
    for cut in [*sorted(set(cuts)), len(raw)]:
        out += conv.feed(raw[last:cut])
        last = cut
    return sse_objects(out + conv.finish())


@settings(max_examples=150)
@given(cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8))
def test_text_stream_at_any_split(cuts: list[int]) -> None:
    raw = "Héllo wörld, ünïcode ✓ text".encode()
    for kind in ("chat", "completions"):
        objs = _stream(kind, ctx(kind, stream=True), raw, cuts)
        for obj in objs:
            validate_chunk(kind, obj)
        key = "delta" if kind == "chat" else None
        text = "".join(
            (c[key].get("content") or "") if key else c["text"] for o in objs for c in o["choices"]
        )
        assert text == raw.decode()
        assert objs[-1]["choices"][0]["finish_reason"] == "stop"


@settings(max_examples=150)
@given(cuts=st.lists(st.integers(min_value=0, max_value=90), max_size=8))
def test_tool_stream_at_any_split(cuts: list[int]) -> None:
    call = b'{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    raw = b"Checking.\n<tool_call>\n" + call + b"\n</tool_call>"
    objs = _stream("chat", ctx(stream=True, tools=TOOLS), raw, cuts)
    for obj in objs:
        validate_chunk("chat", obj)
    deltas = [c["delta"] for o in objs for c in o["choices"]]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "Checking."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert objs[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_usage_is_left_to_the_gateway() -> None:
    objs = _stream("chat", ctx(stream=True, stream_options={"include_usage": True}), b"hi", [])
    assert all(o["usage"] is None for o in objs)


@pytest.mark.parametrize(
    "reply",
    [
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
        '<tool_call>\n```json\n{"name": "get_weather", "parameters": {"city": "Oslo"}}\n```',
        '```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```',
        '{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}',
        '<tool_call>Sure: {"name": "get_weather", "arguments": {"city": "Oslo"}} ok</tool_call>',
    ],
)
def test_lenient_parsing(reply: str) -> None:
    parsed = toolprompt.parse(reply, ("get_weather",))
    (call,) = parsed.tool_calls
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_parsing_leaves_plain_text_alone() -> None:
    for text in ['{"name": "other", "arguments": {}}', "no tools here", "<tool_call>garbage"]:
        assert toolprompt.parse(text, ("get_weather",)) == toolprompt.ParsedReply(text)
    two = toolprompt.parse(
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>',
        ("a", "b"),
    )
    assert [c["function"]["name"] for c in two.tool_calls] == ["a", "b"]


def test_status_answer() -> None:
    assert status_answer(200)[0] == 200
    assert orjson.loads(status_answer(None)[1])["status"] == "down"
