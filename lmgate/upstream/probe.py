"""Check that a provider answers: `GET <base_url>/models` with its key, through its proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from lmgate.upstream.client import ConnectFailed
from lmgate.upstream.provider import Provider

_STATUS_REASONS = {
    401: "the provider rejected the API key",
    403: "the provider refused access (403)",
    404: "no /models here (404): check the base URL (it usually ends in /v1)",
    407: "the proxy wants credentials (407)",
    429: "rate limited (429)",
}


@dataclass
class ProbeResult:
    """What a provider answered to `GET /models`, or why it did not."""

    ok: bool
    status: int | None
    latency_ms: float
    models: list[str] = field(default_factory=list)
    error: str | None = None


async def probe(provider: Provider, timeout: float = 10.0) -> ProbeResult:
    """List the provider's models; failures become `ok=False` with a short, key-free reason."""
    start = time.perf_counter()
    status: int | None = None
    try:
        resp = await provider.request("GET", "/models", total_timeout=timeout)
        try:
            status = resp.status
            body = await resp.read()
        finally:
            resp.release()
    except Exception as e:  # every failure is a result, never a crash
        return ProbeResult(False, status, _ms(start), error=_scrub(provider, _reason(e, timeout)))
    latency = _ms(start)
    if status != 200:
        reason = _STATUS_REASONS.get(status) or _status_reason(status)
        return ProbeResult(False, status, latency, error=reason)
    models = _model_ids(body)
    if models is None:
        return ProbeResult(False, status, latency, error="the answer is not an OpenAI model list")
    return ProbeResult(True, status, latency, models)


async def probe_all(providers: Iterable[Provider], timeout: float = 10.0) -> list[ProbeResult]:
    """Probe providers concurrently, then close their sessions."""
    providers = list(providers)
    try:
        return await asyncio.gather(*(probe(p, timeout) for p in providers))
    finally:
        await asyncio.gather(*(p.close() for p in providers))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _status_reason(status: int) -> str:
    return f"server error ({status})" if status >= 500 else f"unexpected status {status}"


def _reason(e: Exception, timeout: float) -> str:
    """A one-line explanation of a failed request."""
    if isinstance(e, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(e, ConnectFailed):
        return str(e)
    if isinstance(e, ValueError):
        return f"invalid URL or proxy: {e}"
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _scrub(provider: Provider, text: str) -> str:
    """Remove the provider's key, address and proxy password from `text`."""
    text = provider.scrub(text)
    password = urlsplit(provider.proxy).password if provider.proxy else None
    return text.replace(password, "***") if password else text


def _model_ids(body: bytes) -> list[str] | None:
    """The model ids of an OpenAI `ListModelsResponse`, or None if `body` is not one."""
    try:
        data = orjson.loads(body).get("data")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
