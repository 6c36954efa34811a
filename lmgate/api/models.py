"""`/v1/models`: the models the gateway serves, and discovery of a provider's own list."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from lmgate.routing.deployment import Deployment
from lmgate.routing.router import Route, Router
from lmgate.upstream.client import UpstreamError
from lmgate.upstream.provider import Provider

log = logging.getLogger("lmgate.models")
_STARTED = int(time.time())


def model_object(model_id: str, route: Route) -> dict[str, Any]:
    """One entry of OpenAI's `ListModelsResponse`."""
    return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": route.owned_by}


def listing(
    router: Router,
    allowed: Callable[[str], bool] | None = None,
    states: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenAI's `ListModelsResponse` for every listed route (that `allowed` admits).

    Managed models carry their state (ready, starting, cold, failed) in `lmgate_backend`.
    """
    routes = router.listed()
    if allowed is not None:
        routes = [r for r in routes if allowed(r.name)]
    data = []
    for r in routes:
        entry = model_object(r.name, r)
        if r.managed and states is not None and r.name in states:
            entry["lmgate_backend"] = states[r.name]
        data.append(entry)
    return {"object": "list", "data": data}


async def discover(provider: Provider, router: Router, timeout: float = 10.0) -> None:
    """Ask a provider for its models and route each as `<provider>/<model>`."""
    try:
        resp = await provider.request("GET", "/models", total_timeout=timeout)
        try:
            status, raw = resp.status, await resp.read()
        finally:
            resp.release()
        if status != 200:
            log.warning("model discovery on %s: status %d", provider.name, status)
            return
        data = orjson.loads(raw).get("data") or []
    except (UpstreamError, orjson.JSONDecodeError, AttributeError) as e:
        log.warning("model discovery on %s failed: %s", provider.name, type(e).__name__)
        return
    for entry in data:
        model_id = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(model_id, str) and model_id:
            name = f"{provider.name}/{model_id}"
            router.add(Route(name, [Deployment(provider, model_id)], provider.name))
    log.info("discovered %d models on %s", len(data), provider.name)
