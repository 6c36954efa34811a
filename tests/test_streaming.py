"""Streams are relayed as they arrive, end with [DONE], report upstream failures as an error
event, and stop the upstream as soon as the client leaves."""

from __future__ import annotations

import itertools
import socket
import time

import httpx
import openai
import orjson
import pytest

from tests.harness import Servers, one_model

BODY = {
    "model": "m1",
    "messages": [{"role": "user", "content": "one two three four"}],
    "stream": True,
}


def test_chunks_arrive_as_sent(servers: Servers) -> None:
    """With 0.2 s between upstream chunks, the client sees them 0.2 s apart, not all at the end."""
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).base_url
    body = {**BODY, "stub": {"chunk_delay": 0.2, "chunks": 4}}
    arrivals = []
    with httpx.stream("POST", f"{url}/chat/completions", json=body) as r:
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                arrivals.append(time.monotonic() - start)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) >= 4
    assert all(g > 0.1 for g in gaps[1:]), gaps


def test_client_disconnect_closes_upstream(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(one_model(stub.url))
    request = orjson.dumps({**BODY, "stub": {"chunk_delay": 5, "chunks": 10}})
    with socket.create_connection(("127.0.0.1", gw.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        assert b"200 OK" in s.recv(4096)
        deadline = time.monotonic() + 5
        while not stub.stats.stream_started_times and time.monotonic() < deadline:
            time.sleep(0.01)
    closed_at = time.monotonic()
    deadline = closed_at + 3
    while not stub.stats.disconnects and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stub.stats.disconnects == 1
    assert stub.stats.disconnect_times[0] - closed_at < 1.0


def test_sdk_stream_closed_early_closes_upstream(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).base_url
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="m1",
        messages=BODY["messages"],
        stream=True,
        extra_body={"stub": {"chunk_delay": 2, "chunks": 10}},
    )
    next(iter(stream))
    stream.close()
    closed_at = time.monotonic()
    while not stub.stats.disconnects and time.monotonic() < closed_at + 3:
        time.sleep(0.01)
    assert stub.stats.disconnects == 1
    assert stub.stats.disconnect_times[0] - closed_at < 1.0


def test_mid_stream_failure_is_an_error_event(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).base_url
    with httpx.stream(
        "POST", f"{url}/chat/completions", json={**BODY, "stub": {"drop_after": 2}}
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = orjson.loads(events[-1])
    assert last["error"]["code"] == "upstream_disconnected"

    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    stream = client.chat.completions.create(
        model="m1", messages=BODY["messages"], stream=True, extra_body={"stub": {"drop_after": 2}}
    )
    with pytest.raises(openai.APIError, match="broke"):
        for _ in stream:
            pass


def test_upstream_error_before_stream_is_a_plain_error(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).base_url
    r = httpx.post(f"{url}/chat/completions", json={**BODY, "stub": {"status": 400}})
    assert r.status_code == 400 and r.json()["error"]["message"] == "stub error 400"


def test_passthrough_path_and_provider_prefix(servers: Servers) -> None:
    stub = servers.stub()
    gw = servers.gateway(one_model(stub.url, upstream="stub-model"))
    r = httpx.post(f"{gw.base_url}/responses", json={"model": "m1", "input": "hi"})
    assert r.json()["path"] == "/v1/responses"
    assert r.json()["body"]["model"] == "stub-model"  # routed and renamed like any model call
    r = httpx.post(f"{gw.url}/up/v1/responses?x=1", json={"model": "anything", "input": "hi"})
    assert r.json()["body"]["model"] == "anything"  # a named provider gets the body as sent
    models = httpx.get(f"{gw.url}/up/v1/models").json()
    assert models["data"][0]["id"] == "stub-model"
