"""A provider at run time: its HTTP session (keep-alive pool, proxy) and its credentials."""

from __future__ import annotations

import ipaddress
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp_socks import ProxyConnector
from yarl import URL

from lmgate.config.schema import ProviderConfig


class Provider:
    """One upstream API and the connection pool that reaches it."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url
        self.proxy = config.proxy or env_proxy_for(config.base_url)
        self.secret = config.api_key.get_secret_value() if config.api_key else ""
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout.connect, sock_read=config.timeout.read
        )
        headers = {"Accept-Encoding": "identity", **config.headers}
        if self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        self.headers = headers
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The provider's session; created on first use inside the running loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=self._connector(),
                headers=self.headers,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _connector(self) -> aiohttp.BaseConnector:
        limit = self.config.max_connections
        if self.proxy:
            # As in curl: socks5:// resolves names here, socks5h:// at the proxy (python-socks
            # knows no socks5h scheme, only socks5 with remote resolution).
            url, rdns = self.proxy, None
            if url.startswith("socks5://"):
                rdns = False
            elif url.startswith("socks5h://"):
                url, rdns = "socks5://" + url[len("socks5h://") :], True
            return ProxyConnector.from_url(url, rdns=rdns, limit=limit, keepalive_timeout=60)
        return aiohttp.TCPConnector(limit=limit, keepalive_timeout=60, ttl_dns_cache=300)

    def url(self, suffix: str) -> URL:
        """The upstream URL for an OpenAI path suffix such as `/chat/completions`."""
        u = self._urls.get(suffix)
        if u is None:
            u = URL(self.base_url + suffix, encoded=True)
            if len(self._urls) < 1024:
                self._urls[suffix] = u
        return u

    def scrub(self, text: str) -> str:
        """Remove this provider's credentials and address from a text meant for a client."""
        if self.secret:
            text = text.replace(self.secret, "***")
        host = urlsplit(self.base_url).netloc
        return text.replace(self.base_url, f"<{self.name}>").replace(host, f"<{self.name}>")

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def env_proxy_for(url: str) -> str | None:
    """The proxy that `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`/`NO_PROXY` choose for `url`.

    Loopback upstreams never go through an environment proxy: a gateway on a compute node
    with `ALL_PROXY` pointing at an `ssh -D` tunnel still reaches its local workers directly.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if _is_loopback(host) or _bypass(host):
        return None
    proxies = urllib.request.getproxies_environment()
    return proxies.get(parts.scheme) or proxies.get("all") or None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bypass(host: str) -> bool:
    """Whether `NO_PROXY` exempts `host`."""
    bypass: Any = getattr(urllib.request, "proxy_bypass_environment")  # noqa: B009
    return bool(bypass(host))
