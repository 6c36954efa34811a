"""Model resolution: exact names, aliases, `*` patterns and `provider/model` wildcards."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from lmgate.config.schema import GatewayConfig
from lmgate.routing.deployment import Deployment
from lmgate.upstream.provider import Provider

_MAX_DYNAMIC_ROUTES = 4096


@dataclass(eq=False)
class Route:
    """A public model name and the deployments that serve it."""

    name: str
    deployments: list[Deployment]
    owned_by: str
    listed: bool = True
    managed: bool = False
    """Served by instances lmgate launches: the deployments come from the backend manager."""


class Router:
    """Finds the deployments for a model name; built once from the configuration."""

    def __init__(self, config: GatewayConfig, providers: dict[str, Provider]) -> None:
        self.providers = providers
        self.routes: dict[str, Route] = {}
        self._patterns: list[tuple[str, Route]] = []
        self._dynamic: dict[str, Route] = {}
        for m in config.models:
            if m.backend is not None:
                self.routes[m.name] = Route(m.name, [], m.owned_by or "lmgate", managed=True)
                for alias in m.aliases:
                    self.routes[alias] = self.routes[m.name]
                continue
            deployments = [
                Deployment(
                    providers[d.provider],
                    d.model or _same_name(m.name),
                    d.weight,
                    max_inflight=d.max_inflight,
                )
                for d in m.deployments
            ]
            route = Route(m.name, deployments, m.owned_by or m.deployments[0].provider)
            if "*" in m.name:
                self._patterns.append((m.name, route))
                continue
            for name in (m.name, *m.aliases):
                self.routes[name] = route

    def add(self, route: Route) -> None:
        """Register a route found after start (e.g. a provider's discovered model)."""
        self.routes.setdefault(route.name, route)

    def resolve(self, model: str) -> Route | None:
        """The route for `model`, or None when nothing serves it."""
        route = self.routes.get(model) or self._dynamic.get(model)
        if route is not None:
            return route
        route = self._match(model)
        if route is not None and len(self._dynamic) < _MAX_DYNAMIC_ROUTES:
            self._dynamic[model] = route
        return route

    def _match(self, model: str) -> Route | None:
        for pattern, route in self._patterns:
            if fnmatch.fnmatchcase(model, pattern):
                return route
        prefix, sep, rest = model.partition("/")
        provider = self.providers.get(prefix) if sep else None
        if provider is None or not rest or not provider.config.wildcard:
            return None
        return Route(model, [Deployment(provider, rest)], provider.name, listed=False)

    def all_deployments(self) -> list[Deployment]:
        """Every configured deployment (for health checks)."""
        seen: dict[int, Deployment] = {}
        for route in [*self.routes.values(), *(r for _, r in self._patterns)]:
            for d in route.deployments:
                seen.setdefault(id(d), d)
        return list(seen.values())

    def listed(self) -> list[Route]:
        """The routes `/v1/models` shows: configured and discovered names, not patterns."""
        seen: dict[int, Route] = {}
        for name, route in self.routes.items():
            if route.listed and name == route.name:
                seen.setdefault(id(route), route)
        return list(seen.values())


def _same_name(name: str) -> str | None:
    """Deployments of a `*` pattern pass the client's model name through unchanged."""
    return None if "*" in name else name
