"""Upstream traffic through real proxies: an upstream in its own network namespace that only
an `ssh -D` SOCKS5 tunnel and an HTTP proxy (tinyproxy) can reach."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.harness import Servers
from tests.infra.isolated import IsolatedUpstream
from tests.infra.openapi import validate

MSG = [{"role": "user", "content": "through the tunnel"}]


def config(base_url: str, proxy: str | None) -> dict:
    provider: dict = {"base_url": base_url, "api_key": "sk-upstream-secret"}
    if proxy:
        provider["proxy"] = proxy
    return {"providers": {"far": provider}, "models": [{"name": "m", "provider": "far"}]}


def roundtrip(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    completion = client.chat.completions.create(model="m", messages=MSG)
    assert completion.choices[0].message.content.endswith("through the tunnel")
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="m", messages=MSG, stream=True)
        if c.choices
    )
    assert text.endswith("through the tunnel")


def test_direct_route_is_impossible(servers: Servers, isolated_stub: IsolatedUpstream) -> None:
    gw = servers.gateway(config(f"http://{isolated_stub.upstream_host_port}/v1", None))
    r = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


def test_socks5_proxy(servers: Servers, isolated_stub: IsolatedUpstream) -> None:
    gw = servers.gateway(
        config(f"http://{isolated_stub.upstream_host_port}/v1", isolated_stub.socks5_url)
    )
    roundtrip(gw.base_url)
    validate("ListModelsResponse", httpx.get(f"{gw.url}/far/v1/models").json())


@pytest.mark.parametrize("scheme", ["socks5h", "socks5"])
def test_socks5h_resolves_names_at_the_proxy(
    servers: Servers, isolated_stub: IsolatedUpstream, scheme: str
) -> None:
    proxy = isolated_stub.socks5_url.replace("socks5://", f"{scheme}://")
    gw = servers.gateway(config(f"http://{isolated_stub.upstream_named_host_port}/v1", proxy))
    if scheme == "socks5h":
        roundtrip(gw.base_url)
    else:  # the name exists only on the far side: resolving it locally must fail
        r = httpx.post(f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MSG})
        assert r.status_code == 502


def test_http_proxy(servers: Servers, isolated_stub: IsolatedUpstream) -> None:
    before = isolated_stub.proxy_log_path.read_text().count("CONNECT")
    gw = servers.gateway(
        config(f"http://{isolated_stub.upstream_host_port}/v1", isolated_stub.http_proxy_url)
    )
    roundtrip(gw.base_url)
    after = isolated_stub.proxy_log_path.read_text().count("CONNECT")
    assert after > before


def test_environment_proxy(
    servers: Servers, isolated_stub: IsolatedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ALL_PROXY is read when the gateway starts (the test's own clients must not see it)."""
    socks5h = isolated_stub.socks5_url.replace("socks5://", "socks5h://")
    far = f"http://{isolated_stub.upstream_named_host_port}/v1"
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", socks5h)
    gw = servers.gateway(config(far, None))
    monkeypatch.setenv("NO_PROXY", isolated_stub.upstream_named_host_port.split(":")[0])
    exempt = servers.gateway(config(far, None))
    monkeypatch.delenv("ALL_PROXY")
    monkeypatch.delenv("NO_PROXY")
    roundtrip(gw.base_url)
    r = httpx.post(f"{exempt.base_url}/chat/completions", json={"model": "m", "messages": MSG})
    assert r.status_code == 502  # NO_PROXY exempts it, and directly it is unreachable
