"""A provider at run time: its HTTP session (keep-alive pool, proxy) and its credentials."""

from __future__ import annotations

import ipaddress
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from lmgate.adapters import Adapter, create_adapter
from lmgate.config.schema import ProviderConfig
from lmgate.upstream.client import UpstreamPool, UpstreamResponse


class Provider:
    """One upstream API and the connection pool that reaches it."""

    def __init__(self, name: str, config: ProviderConfig) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url
        self.proxy = config.proxy or env_proxy_for(config.base_url)
        self.secret = config.api_key.get_secret_value() if config.api_key else ""
        self.adapter: Adapter = create_adapter(config.type, config.model_dump())
        self.passthrough = self.adapter.passthrough
        """An OpenAI-compatible upstream: requests and answers are relayed unchanged."""
        headers = {"Accept-Encoding": "identity", **config.headers}
        if not self.passthrough:
            headers.update(self.adapter.auth_headers(self.secret))
        elif self.secret:
            headers["Authorization"] = f"Bearer {self.secret}"
        self.headers = headers
        self._pool: UpstreamPool | None = None

    @property
    def pool(self) -> UpstreamPool:
        """The provider's keep-alive pool (through its proxy, if any)."""
        if self._pool is None:
            self._pool = UpstreamPool(
                self.base_url,
                proxy=self.proxy,
                headers=self.headers,
                max_connections=self.config.max_connections,
                connect_timeout=self.config.timeout.connect,
            )
        return self._pool

    async def request(
        self,
        method: str,
        suffix: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        total_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send a request to base URL + `suffix` with the provider's credentials."""
        return await self.pool.request(
            method,
            suffix,
            body=body,
            headers=headers,
            read_timeout=self.config.timeout.read,
            total_timeout=total_timeout,
        )

    def scrub(self, text: str) -> str:
        """Remove this provider's credentials and address from a text meant for a client."""
        if self.secret:
            text = text.replace(self.secret, "***")
        host = urlsplit(self.base_url).netloc
        return text.replace(self.base_url, f"<{self.name}>").replace(host, f"<{self.name}>")

    async def close(self) -> None:
        """Close the connection pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


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
