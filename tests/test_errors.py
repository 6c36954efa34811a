"""Bad input gets OpenAI's error envelope with the right status; upstream errors are relayed
without the provider's credentials or addresses."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from aiohttp import web

from tests.harness import LoopThread, Servers, one_model
from tests.infra.openapi import validate


@pytest.fixture
def gw_url(servers: Servers) -> str:
    stub = servers.stub()
    config = one_model(stub.url)
    config["server"] = {"max_body_bytes": 4096}
    return servers.gateway(config).url


def check_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-request-id"]
    body = r.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_invalid_json(gw_url: str) -> None:
    r = httpx.post(f"{gw_url}/v1/chat/completions", content=b"{not json")
    check_error(r, 400, "invalid_json")


def test_body_not_an_object(gw_url: str) -> None:
    r = httpx.post(f"{gw_url}/v1/chat/completions", content=b"[1, 2]")
    check_error(r, 400, "invalid_json")


@pytest.mark.parametrize("body", [{}, {"model": ""}, {"model": 3}, {"model": None}])
def test_missing_model(gw_url: str, body: dict) -> None:
    r = httpx.post(f"{gw_url}/v1/chat/completions", json={**body, "messages": []})
    err = check_error(r, 400, "missing_required_parameter")
    assert err["param"] == "model"


def test_body_too_large(gw_url: str) -> None:
    big = {"model": "m1", "messages": [{"role": "user", "content": "x" * 5000}]}
    check_error(httpx.post(f"{gw_url}/v1/chat/completions", json=big), 413, "request_too_large")


def test_body_too_large_chunked(gw_url: str) -> None:
    def chunks():
        yield b'{"model": "m1", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(f"{gw_url}/v1/chat/completions", content=chunks())
    check_error(r, 413, "request_too_large")


def test_wrong_method(gw_url: str) -> None:
    r = httpx.get(f"{gw_url}/v1/chat/completions")
    check_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    check_error(httpx.post(f"{gw_url}/v1/models", json={}), 405)


@pytest.mark.parametrize("path", ["/", "/nope", "/v2/chat/completions", "/unknown/v1/models"])
def test_unknown_path(gw_url: str, path: str) -> None:
    check_error(httpx.post(f"{gw_url}{path}", json={"model": "m1"}), 404, "unknown_url")


def test_unknown_model_with_sdk(gw_url: str) -> None:
    client = openai.OpenAI(base_url=f"{gw_url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    assert e.value.param == "model"


def test_request_id_propagated_and_forwarded(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).url
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    headers = {k.lower(): v for k, v in stub.stats.last_request["headers"].items()}
    assert headers["x-request-id"] == "abc-123"
    r2 = httpx.post(f"{url}/v1/chat/completions", json=body)
    assert len(r2.headers["x-request-id"]) >= 16


def test_client_credentials_not_forwarded(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).url
    body = {"model": "m1", "messages": [{"role": "user", "content": "x"}]}
    httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"authorization": "Bearer user-key"}
    )
    headers = {k.lower(): v for k, v in stub.stats.last_request["headers"].items()}
    assert headers["authorization"] == "Bearer sk-upstream-secret"


def test_upstream_error_status_and_message(servers: Servers) -> None:
    stub = servers.stub()
    url = servers.gateway(one_model(stub.url)).url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"stub": {"status": 400}},
        )
    assert "stub error 400" in e.value.message


async def _leaky_upstream(request: web.Request) -> web.Response:
    """An upstream whose errors quote its own credentials and address, as some do."""
    auth = request.headers.get("Authorization", "")
    message = f"bad things at {request.url} with {auth} (key {auth.removeprefix('Bearer ')})"
    status = int(request.query.get("status", "400"))
    return web.json_response(
        {"error": {"message": message, "type": "x", "code": "c"}}, status=status
    )


@pytest.fixture
def leaky_url(loop_thread: LoopThread):
    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", _leaky_upstream)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = loop_thread.run(start())
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    loop_thread.run(runner.cleanup())


def test_upstream_error_is_scrubbed(servers: Servers, leaky_url: str) -> None:
    url = servers.gateway(one_model(leaky_url)).url
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m1", "messages": []})
    err = check_error(r, 400, "c")
    assert "sk-upstream-secret" not in r.text
    assert leaky_url.split("//")[1].split("/")[0] not in r.text
    assert "bad things" in err["message"]


def test_upstream_auth_failure_is_a_gateway_error(servers: Servers, leaky_url: str) -> None:
    url = servers.gateway(one_model(leaky_url)).url
    r = httpx.post(f"{url}/v1/chat/completions?status=401", json={"model": "m1", "messages": []})
    err = check_error(r, 502, "upstream_auth_failed")
    assert "sk-upstream-secret" not in r.text and "up" in err["message"]


def test_upstream_unreachable(servers: Servers) -> None:
    url = servers.gateway(one_model("http://127.0.0.1:9/v1")).url
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "m1", "messages": []})
    check_error(r, 502, "upstream_unreachable")


def test_health_and_ready(gw_url: str) -> None:
    assert httpx.get(f"{gw_url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{gw_url}/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_never_a_500_on_garbage(gw_url: str) -> None:
    """A burst of odd requests: every answer is a 4xx envelope, none a 500."""
    odd = [
        b"",
        b"null",
        b'"str"',
        b"{}",
        b'{"model": {}}',
        b'{"model": "m1", "timeout": "x"}',
        b'{"model": "m1", "timeout": -1}',
        b"\xff\xfe",
        b'{"model": "m1", "timeout": true}',
    ]
    async with httpx.AsyncClient() as c:
        rs = await asyncio.gather(
            *(c.post(f"{gw_url}/v1/chat/completions", content=b) for b in odd)
        )
    for r in rs:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        validate("ErrorResponse", r.json())
