"""The isolated upstream is reachable through its SOCKS5 and HTTP proxies, and only so."""

from __future__ import annotations

import secrets
import socket
import sys
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp_socks import ProxyConnector

from tests.infra import isolated
from tests.infra.isolated import IsolatedUpstream, IsolationError, isolated_upstream, require_netns

TOKEN = secrets.token_hex(8)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedUpstream]:
    """``python -m http.server`` serving /token.txt, which holds TOKEN."""
    require_netns()
    served = tmp_path_factory.mktemp("served")
    (served / "token.txt").write_text(TOKEN)

    def http_server(port: int) -> list[str]:
        argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
        return [*argv, "--directory", str(served)]

    with isolated_upstream(http_server) as running:
        yield running


async def _get_token(
    url: str, connector: aiohttp.BaseConnector | None = None, proxy: str | None = None
) -> str:
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"{url}/token.txt", proxy=proxy) as response,
    ):
        assert response.status == 200
        return await response.text()


def test_direct_connection_is_refused(upstream: IsolatedUpstream) -> None:
    host, port = upstream.upstream_host_port.split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=1)


async def test_socks5_reaches_upstream(upstream: IsolatedUpstream) -> None:
    connector = ProxyConnector.from_url(upstream.socks5_url)
    assert await _get_token(f"http://{upstream.upstream_host_port}", connector) == TOKEN


async def test_socks5h_resolves_names_through_the_proxy(upstream: IsolatedUpstream) -> None:
    """python-socks rejects ``socks5h://``: it is ``socks5://`` with ``rdns=True``."""
    named_url = f"http://{upstream.upstream_named_host_port}"
    connector = ProxyConnector.from_url(upstream.socks5_url, rdns=True)
    assert await _get_token(named_url, connector) == TOKEN
    with pytest.raises(aiohttp.ClientOSError):  # resolved locally, where it is unknown
        await _get_token(named_url, ProxyConnector.from_url(upstream.socks5_url, rdns=False))


@pytest.mark.parametrize("address", ["upstream_host_port", "upstream_named_host_port"])
async def test_http_proxy_forwards_plain_http(upstream: IsolatedUpstream, address: str) -> None:
    url = f"http://{getattr(upstream, address)}"
    assert await _get_token(url, proxy=upstream.http_proxy_url) == TOKEN
    assert f"GET {url}/token.txt HTTP/1.1" in upstream.proxy_log_path.read_text()


async def test_http_proxy_tunnels_connect(upstream: IsolatedUpstream) -> None:
    connector = ProxyConnector.from_url(upstream.http_proxy_url)
    assert await _get_token(f"http://{upstream.upstream_host_port}", connector) == TOKEN
    log = upstream.proxy_log_path.read_text()
    assert f"CONNECT {upstream.upstream_host_port} HTTP/1.1" in log


def test_setup_failure_reports_the_daemon_output() -> None:
    require_netns()

    def crashing(port: int) -> list[str]:
        return [sys.executable, "-c", f"raise SystemExit('cannot serve port {port}')"]

    with (
        pytest.raises(IsolationError, match="upstream exited with status 1") as failure,
        isolated_upstream(crashing, timeout=5),
    ):
        pytest.fail("setup should have failed")
    assert "cannot serve port" in str(failure.value)


@pytest.mark.parametrize(
    ("ci", "outcome"), [("true", pytest.fail.Exception), ("", pytest.skip.Exception)]
)
def test_missing_namespaces_fail_in_ci_and_skip_elsewhere(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: type[BaseException]
) -> None:
    monkeypatch.setattr(isolated, "_netns_problem", lambda: "no namespaces here")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="no namespaces here"):
        require_netns()
