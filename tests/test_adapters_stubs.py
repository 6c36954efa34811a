"""The ARGO and Anthropic stubs themselves: formats, streaming, errors, tools, usage."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from lmgate.testing.anthropic_stub import REPLY_PREFIX, AnthropicStubOptions, start_anthropic_stub
from lmgate.testing.argo_stub import REPLY_PREFIX as ARGO_PREFIX
from lmgate.testing.argo_stub import RunningServer, start_argo_stub
from tests.harness import LoopThread

WEATHER = {"name": "get_weather", "input_schema": {"type": "object"}}
USER = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def claude(loop_thread: LoopThread) -> Iterator[tuple[anthropic.Anthropic, RunningServer]]:
    stub = loop_thread.run(start_anthropic_stub(AnthropicStubOptions(api_key="sk-ant-test")))
    client = anthropic.Anthropic(base_url=stub.base, api_key="sk-ant-test", max_retries=0)
    yield client, stub
    loop_thread.run(stub.close())


@pytest.fixture
def argo(loop_thread: LoopThread) -> Iterator[RunningServer]:
    stub = loop_thread.run(start_argo_stub())
    yield stub
    loop_thread.run(stub.close())


def test_anthropic_create_and_usage(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    client, stub = claude
    message = client.messages.create(model="claude-x", max_tokens=50, messages=USER)
    assert message.content[0].type == "text"
    assert message.content[0].text == REPLY_PREFIX + "hello there"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 8)
    assert stub.stats.last_request is not None
    assert stub.stats.last_request["headers"]["Authorization"] == "Bearer sk-ant-test"


def test_anthropic_cache_tokens(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    client, _ = claude
    system: Any = [{"type": "text", "text": "a b c d", "cache_control": {"type": "ephemeral"}}]
    first = client.messages.create(model="c", max_tokens=50, system=system, messages=USER)
    second = client.messages.create(model="c", max_tokens=50, system=system, messages=USER)
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (4, 0)
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (
        0,
        4,
    )
    assert first.usage.input_tokens == second.usage.input_tokens == 5


def test_anthropic_stream_with_tool(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    client, _ = claude
    messages: Any = [{"role": "user", "content": 'use the tool get_weather with {"city": "Oslo"}'}]
    with client.messages.stream(
        model="c", max_tokens=50, tools=[WEATHER], messages=messages
    ) as stream:
        final = stream.get_final_message()
    text, call = final.content
    assert text.type == "text" and call.type == "tool_use"
    assert (call.name, call.input, final.stop_reason) == (
        "get_weather",
        {"city": "Oslo"},
        "tool_use",
    )
    result: Any = [
        *messages,
        {"role": "assistant", "content": [c.model_dump() for c in final.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    answer = client.messages.create(model="c", max_tokens=50, tools=[WEATHER], messages=result)
    assert answer.content[0].type == "text" and answer.content[0].text == "Tool result: sunny"


def test_anthropic_stops(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    client, _ = claude
    cut = client.messages.create(model="c", max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = client.messages.create(
        model="c", max_tokens=50, messages=USER, stop_sequences=["stub"]
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "stub")


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, anthropic.RateLimitError),
        (529, anthropic.OverloadedError),
        (500, anthropic.InternalServerError),
    ],
)
def test_anthropic_errors(
    claude: tuple[anthropic.Anthropic, RunningServer], status: int, error: type[Exception]
) -> None:
    client, _ = claude
    with pytest.raises(error):
        client.messages.create(
            model="c", max_tokens=5, messages=USER, extra_body={"stub": {"status": status}}
        )


def test_anthropic_request_checks(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    _client, stub = claude
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=stub.base, api_key="wrong", max_retries=0).messages.create(
            model="c", max_tokens=5, messages=USER
        )
    r = httpx.post(
        f"{stub.url}/messages",
        json={"model": "c", "messages": USER},
        headers={"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


def test_anthropic_stream_error(claude: tuple[anthropic.Anthropic, RunningServer]) -> None:
    client, _ = claude
    with (
        pytest.raises(anthropic.APIStatusError, match="Overloaded"),
        client.messages.stream(
            model="c",
            max_tokens=50,
            messages=[{"role": "user", "content": "hi [stub error_after=2]"}],
        ) as stream,
    ):
        stream.get_final_message()


def test_argo_chat_stream_and_embed(argo: RunningServer) -> None:
    body = {"user": "alice", "model": "gpt4o", "messages": [{"role": "user", "content": "hi you"}]}
    r = httpx.post(f"{argo.url}/resource/chat/", json=body)
    assert r.json() == {"response": ARGO_PREFIX + "hi you"}
    with httpx.stream("POST", f"{argo.url}/resource/streamchat/", json=body) as s:
        assert s.headers["content-type"].startswith("text/plain")
        pieces = list(s.iter_bytes())
    assert b"".join(pieces).decode() == ARGO_PREFIX + "hi you"
    emb = httpx.post(
        f"{argo.url}/resource/embed/", json={"user": "a", "model": "v3small", "prompt": ["x", "y"]}
    )
    vectors = emb.json()["embedding"]
    assert len(vectors) == 2 and len(vectors[0]) == 8 and vectors[0] != vectors[1]
    assert httpx.get(f"{argo.url}/resource/health/").status_code == 200
    assert argo.stats.by_path == {
        "/argoapi/api/v1/resource/chat/": 1,
        "/argoapi/api/v1/resource/streamchat/": 1,
        "/argoapi/api/v1/resource/embed/": 1,
    }


def test_argo_controls(argo: RunningServer) -> None:
    def chat(text: str, **extra: Any) -> httpx.Response:
        body = {
            "user": "a",
            "model": "gpt4o",
            "messages": [{"role": "user", "content": text}],
            **extra,
        }
        return httpx.post(f"{argo.url}/resource/chat/", json=body)

    assert chat("x [stub status=503]").status_code == 503
    assert chat("x [stub status=503]").json() == {"detail": "stub error 503"}
    reply = chat('use the tool f with {"a": 1}').json()["response"]
    assert '<tool_call>\n{"name":"f","arguments":{"a":1}}\n</tool_call>' in reply
    assert (
        chat("one two three", max_tokens=3).json()["response"]
        == ARGO_PREFIX.split()[0] + " is lmgate's"
    )
    no_user = httpx.post(f"{argo.url}/resource/chat/", json={"model": "gpt4o", "messages": []})
    assert no_user.status_code == 400 and "user" in no_user.json()["detail"]


@pytest.mark.parametrize("module", ["lmgate.testing.argo_stub", "lmgate.testing.anthropic_stub"])
def test_command_line(module: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", "0"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.split()[-1]
        health = "/resource/health/" if "argo" in module else "/../health"
        assert httpx.get(url + health, follow_redirects=True).status_code == 200
    finally:
        proc.terminate()
        proc.wait(5)
