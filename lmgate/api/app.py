"""The gateway's ASGI application: dispatch of the `/v1` surface, health, lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from lmgate.adapters.argo import NATIVE as ARGO_NATIVE
from lmgate.adapters.argo import status_answer, status_call
from lmgate.api import models as model_list
from lmgate.api.errors import GatewayError
from lmgate.api.http import JSON, ClientGone, Receive, Request, Scope, Send
from lmgate.api.messages import MessagesSend, entrance_call
from lmgate.api.relay import Call, Observer, Observers, Payload, forward
from lmgate.api.services import Services, open_services
from lmgate.auth.keys import Principal
from lmgate.cache.service import HIT, MISS, CacheHit, open_cache
from lmgate.config.schema import GatewayConfig
from lmgate.limits.limiter import NO_LIMITS
from lmgate.limits.tokens import estimate_request_tokens
from lmgate.routing.deployment import Deployment
from lmgate.routing.router import Route, Router
from lmgate.upstream.client import UpstreamError
from lmgate.upstream.provider import Provider

log = logging.getLogger("lmgate")

Handler = Callable[[Request], Awaitable[None]]
_MAX_TIMEOUT = 24 * 3600.0
_JSON_TYPES = (b"application/json", b"text/json")
_PATH_KEY = "/lmg-"
_KINDS = {"/chat/completions": "chat", "/completions": "completions", "/embeddings": "embeddings"}
_ARGO_STATUS = "/status"


class Gateway:
    """An OpenAI-compatible gateway in front of the configured providers."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.providers = {name: Provider(name, pc) for name, pc in config.providers.items()}
        self.router = Router(config, self.providers)
        self.limit = config.server.max_body_bytes
        self.ready = False
        self.services = Services()
        self.cache = open_cache(config.cache)
        self._direct = {name: [Deployment(p, None)] for name, p in self.providers.items()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._routes: dict[str, tuple[str, Handler]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/models": ("GET", self._models),
            "/health": ("GET", self._health),
            "/ready": ("GET", self._ready),
            "/metrics": ("GET", self._metrics),
            "/v1/messages": ("POST", self._messages),
        }
        self._argo = [p for p in self.providers.values() if p.config.type == "argo"]
        if self._argo:  # ARGO's own endpoints; without an ARGO provider they pass through
            for path in ARGO_NATIVE:
                self._routes["/v1" + path] = ("POST", self._argo_route)
            self._routes["/v1" + _ARGO_STATUS] = ("GET", self._argo_route)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            req = Request(scope, receive, send)
            try:
                await self._dispatch(req)
            except GatewayError as e:
                await req.fail(e)
            except ClientGone:
                pass
            except Exception:
                log.exception("internal error on %s %s", req.method, req.path)
                await req.fail(GatewayError(500, "Internal gateway error.", code="internal_error"))
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _dispatch(self, req: Request) -> None:
        path = req.path
        if path.startswith(_PATH_KEY):
            path = self._key_from_path(req)
        route = self._routes.get(path)
        if route is not None:
            method, handler = route
            if req.method != method:
                raise GatewayError(
                    405,
                    f"Method {req.method} is not allowed on {path}; use {method}.",
                    code="method_not_allowed",
                    headers={"Allow": method},
                )
            await handler(req)
        elif path.startswith("/v1/models/"):
            await self._model(req, path[len("/v1/models/") :])
        elif path.startswith("/v1/"):
            await self._passthrough(req, None, path[3:])
        elif path.startswith("/internal/backends/"):
            await self._internal(req)
        elif path == "/admin" or path.startswith("/admin/"):
            await self._admin(req)
        else:
            head, _, rest = path[1:].partition("/")
            provider = self.providers.get(head)
            if provider is None or not (rest == "v1" or rest.startswith("v1/")):
                raise GatewayError(404, f"Invalid URL ({req.method} {path}).", code="unknown_url")
            if provider.config.type == "argo" and (
                rest[2:] in ARGO_NATIVE or rest[2:] == _ARGO_STATUS
            ):
                await self._argo_native(req, provider, rest[2:])
                return
            await self._passthrough(req, provider.name, rest[2:])

    async def _chat(self, req: Request) -> None:
        await self._model_call(req, "/chat/completions", True, "chat")

    async def _completions(self, req: Request) -> None:
        await self._model_call(req, "/completions", True, "completions")

    async def _embeddings(self, req: Request) -> None:
        await self._model_call(req, "/embeddings", False, "embeddings")

    def _key_from_path(self, req: Request) -> str:
        """`/{key}/v1/...`, for clients whose base URL carries the key: take it out of the path."""
        key, _, rest = req.path[1:].partition("/")
        req.api_key = key.encode()
        req.path = "/" + rest
        req.scope["path"] = req.path  # so that nothing downstream (logs) ever sees the key
        return req.path

    async def _authenticate(self, req: Request) -> Principal | None:
        """The caller, when keys are required."""
        if not self.config.auth.enabled:
            return None
        keys = self.services.keys
        if keys is None:
            raise GatewayError(503, "The gateway is starting.", code="not_ready")
        return await keys.authenticate(req.api_key)

    async def _model_call(self, req: Request, suffix: str, streams: bool, kind: str) -> None:
        """A request that names its model: authenticate, parse once, route, meter, forward."""
        principal = await self._authenticate(req)
        raw = await req.body(self.limit)
        data = _json_object(raw)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400,
                "You must provide a model parameter.",
                param="model",
                code="missing_required_parameter",
            )
        payload = Payload(raw, data, model)
        timeout = _timeout(req, payload)
        route = self.router.resolve(model)
        if route is None or (principal is not None and not principal.may_use(model)):
            raise _model_not_found(model) if route is None else _model_forbidden(model)
        call = Call(
            "POST",
            _with_query(req, suffix),
            timeout,
            expects_done=streams and data.get("stream") is True,
            content_type=b"application/json",
            kind=kind,
            user=principal.user_name if principal is not None else None,
        )
        deployments = await self._deployments(route)
        await self._metered(req, call, payload, deployments, principal, model, suffix)

    async def _messages(self, req: Request) -> None:
        """`POST /v1/messages`, Anthropic's API, on any model; answers in Anthropic's format."""
        out = MessagesSend(req.send)
        req.send = out  # from here on, errors too leave in Anthropic's format
        principal = await self._authenticate(req)
        raw = await req.body(self.limit)
        data = _json_object(raw)
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(
                400, "model: Field required", param="model", code="missing_required_parameter"
            )
        out.model = model
        payload = Payload(raw, data, model)
        timeout = _timeout(req, payload)
        route = self.router.resolve(model)
        if route is None or (principal is not None and not principal.may_use(model)):
            raise _model_not_found(model) if route is None else _model_forbidden(model)
        user = principal.user_name if principal is not None else None
        deployments = await self._deployments(route)
        call, payload, out.convert = entrance_call(data, payload, deployments, timeout, user)
        await self._metered(req, call, payload, deployments, principal, model)

    async def _argo_route(self, req: Request) -> None:
        """`/v1/chat`, `/v1/streamchat`, `/v1/embed`, `/v1/status` on the only ARGO provider."""
        if len(self._argo) > 1:
            names = ", ".join(f"/{p.name}{req.path}" for p in self._argo)
            raise GatewayError(
                400,
                f"Several ARGO providers are configured: use one of {names}.",
                code="ambiguous_provider",
            )
        await self._argo_native(req, self._argo[0], req.path[3:])

    async def _argo_native(self, req: Request, provider: Provider, suffix: str) -> None:
        """ARGO's own API, passed through as is; `/status` asks ARGO's health check."""
        method = "GET" if suffix == _ARGO_STATUS else "POST"
        if req.method != method:
            raise GatewayError(
                405,
                f"Method {req.method} is not allowed on {req.path}; use {method}.",
                code="method_not_allowed",
                headers={"Allow": method},
            )
        principal = await self._authenticate(req)
        if suffix == _ARGO_STATUS:
            await self._argo_status(req, provider)
            return
        raw = await req.body(self.limit)
        payload = Payload(raw, _json_object(raw))
        timeout = _timeout(req, payload)
        assert payload.data is not None
        name = payload.data.get("model")
        model = f"{provider.name}/{name if isinstance(name, str) else '-'}"
        if principal is not None and not principal.may_use(model):
            raise _model_forbidden(model)
        call = Call(
            "POST",
            ARGO_NATIVE[suffix],
            timeout,
            content_type=JSON,
            user=principal.user_name if principal is not None else None,
            api="argo",
        )
        await self._metered(req, call, payload, self._direct[provider.name], principal, model)

    async def _argo_status(self, req: Request, provider: Provider) -> None:
        up = status_call()
        status: int | None = None
        try:
            resp = await provider.request(up.method, up.suffix, None, up.headers, 10.0)
        except (UpstreamError, TimeoutError) as e:
            log.warning("ARGO provider %s: health check failed: %s", provider.name, e)
        else:
            try:
                await resp.read()
                status = resp.status
            except UpstreamError:
                pass
            finally:
                resp.release()
        code, body = status_answer(status)
        await req.respond(code, body)

    async def _metered(
        self,
        req: Request,
        call: Call,
        payload: Payload,
        deployments: list[Deployment],
        principal: Principal | None,
        model: str,
        kind: str | None = None,
    ) -> None:
        """Admit against rate limits, answer from the cache, or forward with observers."""
        admission = NO_LIMITS
        limiter = self.services.limiter
        metrics = self.services.metrics
        if limiter is not None:
            estimate = estimate_request_tokens(payload)
            try:
                admission = await limiter.admit(
                    principal, model, estimate, req.record_id.decode("ascii", "replace")
                )
            except GatewayError as refused:
                if metrics is not None and refused.status == 429:
                    metrics.rate_limited(model, refused.type)
                raise
            call.headers = admission.headers or None
            if limiter.redis is not None:  # deployments' max_inflight, across replicas
                call.slots = limiter
        recorder = None
        if metrics is not None:
            metrics.inflight(1)
        try:
            if self.cache is not None and kind is not None and payload.data is not None:
                plan = self.cache.plan(
                    kind,
                    payload.data,
                    principal,
                    req.header(b"cache-control"),
                    req.header(b"x-lmgate-cache-ttl"),
                )
                if plan is not None:
                    hit = await self.cache.lookup(plan)
                    if metrics is not None:
                        metrics.cache(hit is not None, model)
                    if hit is not None:
                        await self._cached(req, call, hit, principal, model)
                        return
                    recorder = self.cache.recorder(plan)
                    call.headers = [*(call.headers or ()), MISS]
            await self._observed(req, call, payload, deployments, principal, model, recorder)
        finally:
            if metrics is not None:
                metrics.inflight(-1)
            used = call.tokens
            admission.finish(used if used is not None else estimate_request_tokens(payload))
            if recorder is not None:
                await recorder.commit()

    async def _observed(
        self,
        req: Request,
        call: Call,
        payload: Payload,
        deployments: list[Deployment],
        principal: Principal | None,
        model: str,
        recorder: Observer | None,
    ) -> None:
        """Forward, with a meter (and the cache's recorder) watching the answer."""
        acc = self.services.accounting
        if acc is None:
            call.observer = recorder
            await forward(req, call, payload, deployments, self.config.routing)
            return
        meter = await acc.meter(
            req.record_id, principal, model, payload, deployments[0].upstream_model, call.api
        )
        call.observer = meter if recorder is None else Observers(recorder, meter)
        error: GatewayError | None = None
        try:
            await forward(req, call, payload, deployments, self.config.routing)
        except GatewayError as e:
            error = e
            raise
        except ClientGone:
            error = GatewayError(499, "The client closed the connection.", code="client_gone")
            raise
        except Exception:
            error = GatewayError(500, "Internal gateway error.", code="internal_error")
            raise
        finally:
            meter.finish(error)
            call.tokens = meter.tokens

    async def _cached(
        self, req: Request, call: Call, hit: CacheHit, principal: Principal | None, model: str
    ) -> None:
        """Answer from the cache, and record the hit."""
        extra = [*(call.headers or ()), HIT]
        acc = self.services.accounting
        if acc is not None:
            cost, call.tokens = acc.record_hit(
                req.record_id, principal, model, hit.body, self.config.cache.bill_hits
            )
            extra.append((b"x-lmgate-cost", f"{cost:.8f}".encode()))
        await req.respond(200, hit.content, hit.content_type, extra)

    async def _passthrough(self, req: Request, provider: str | None, suffix: str) -> None:
        """Any other OpenAI path: routed by the body's model, or to a named/default provider."""
        principal = await self._authenticate(req)
        raw = await req.body(self.limit) if req.method not in ("GET", "HEAD") else b""
        payload = Payload(raw or None)
        if raw and req.content_type and req.content_type.split(b";")[0].strip() in _JSON_TYPES:
            payload.data = _json_object(raw)
            model = payload.data.get("model")
            payload.model = model if isinstance(model, str) else None
        timeout = _timeout(req, payload)
        model = payload.model or f"{provider or '-'}:{suffix.split('?')[0]}"
        if principal is not None and not principal.may_use(model):
            raise _model_forbidden(model)
        deployments = await self._passthrough_target(provider, payload)
        call = Call(
            req.method,
            _with_query(req, suffix),
            timeout,
            expects_done=suffix in ("/chat/completions", "/completions")
            and payload.data is not None
            and payload.data.get("stream") is True,
            content_type=req.content_type,
            kind=_KINDS.get(suffix),
            user=principal.user_name if principal is not None else None,
        )
        await self._metered(req, call, payload, deployments, principal, model)

    async def _passthrough_target(self, provider: str | None, payload: Payload) -> list[Deployment]:
        if provider is not None:
            payload.model = None  # the body goes to the named provider exactly as sent
            return self._direct[provider]
        if payload.model:
            route = self.router.resolve(payload.model)
            if route is None:
                raise _model_not_found(payload.model)
            return await self._deployments(route)
        name = self.config.server.default_provider or next(iter(self.providers), None)
        if name is None:
            raise GatewayError(404, "No provider is configured for this path.", code="unknown_url")
        return self._direct[name]

    async def _models(self, req: Request) -> None:
        principal = await self._authenticate(req)
        allowed = principal.may_use if principal is not None else None
        states = self.services.backends.model_states() if self.services.backends else None
        await req.respond(200, orjson.dumps(model_list.listing(self.router, allowed, states)))

    async def _model(self, req: Request, model_id: str) -> None:
        if req.method != "GET":
            raise GatewayError(
                405,
                f"Method {req.method} is not allowed on {req.path}; use GET.",
                code="method_not_allowed",
                headers={"Allow": "GET"},
            )
        principal = await self._authenticate(req)
        route = self.router.resolve(model_id)
        if route is None or (principal is not None and not principal.may_use(model_id)):
            raise _model_not_found(model_id)
        await req.respond(200, orjson.dumps(model_list.model_object(model_id, route)))

    async def _deployments(self, route: Route) -> list[Deployment]:
        """A route's deployments; for a managed model, its ready instances (starting one)."""
        if not route.managed:
            return route.deployments
        manager = self.services.backends
        if manager is None:
            raise GatewayError(503, "The gateway is starting.", code="not_ready")
        model = route.name
        cold = manager.on_request(model)
        if cold is not None:
            wait = manager.cold_wait(model)
            ready = wait > 0 and cold.state != "failed" and await manager.wait_ready(model, wait)
            if not ready:
                raise GatewayError(
                    503,
                    cold.message,
                    code="model_failed" if cold.state == "failed" else "model_not_ready",
                    type="service_unavailable",
                    headers={"Retry-After": str(cold.retry_after)},
                )
        deployments = manager.deployments(model)
        if not deployments:
            raise GatewayError(
                503,
                f"No instance of {model!r} is ready yet.",
                code="model_not_ready",
                type="service_unavailable",
                headers={"Retry-After": "5"},
            )
        return deployments

    async def _internal(self, req: Request) -> None:
        """Workers of managed models register and report their load here (per-job secret)."""
        manager = self.services.backends
        if manager is None or req.method != "POST":
            raise GatewayError(404, f"Invalid URL ({req.method} {req.path}).", code="unknown_url")
        payload = _json_object(await req.body(self.limit))
        secret = (req.api_key or b"").decode("latin-1")
        if req.path.endswith("/register"):
            status, body = await manager.handle_register(payload, secret)
        elif req.path.endswith("/telemetry"):
            status, body = await manager.handle_telemetry(payload, secret)
        else:
            raise GatewayError(404, f"Invalid URL ({req.method} {req.path}).", code="unknown_url")
        await req.respond(status, orjson.dumps(body))

    async def _admin(self, req: Request) -> None:
        """`/admin/...`: the admin API, when a database is configured."""
        if self.services.admin is None:
            raise GatewayError(
                404, "The admin API needs auth or accounting enabled.", code="unknown_url"
            )
        scope = dict(req.scope)
        scope["root_path"] = scope.get("root_path", "") + "/admin"
        scope["path"] = req.path[len("/admin") :] or "/"
        await self.services.admin_app(scope, req.receive, req.send)

    async def _metrics(self, req: Request) -> None:
        metrics = self.services.metrics
        if metrics is None:
            raise GatewayError(404, "Metrics are turned off.", code="unknown_url")
        body, content_type = metrics.render()
        await req.respond(200, body, content_type.encode())

    async def _health(self, req: Request) -> None:
        await req.respond(200, b'{"status":"ok"}')

    async def _ready(self, req: Request) -> None:
        ok = self.ready and bool(self.providers)
        body = {"status": "ready" if ok else "starting", "models": len(self.router.listed())}
        await req.respond(200 if ok else 503, orjson.dumps(body))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Start background work (model discovery) and declare the gateway ready."""
        for p in self.providers.values():
            if p.config.discover_models:
                task = asyncio.create_task(model_list.discover(p, self.router))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self.services = await open_services(self.config, self.router.all_deployments())
        self.ready = True

    async def shutdown(self) -> None:
        """Stop background work, flush the ledger and close every connection pool."""
        self.ready = False
        for t in list(self._tasks):
            t.cancel()
        await self.services.close()
        await asyncio.gather(*(p.close() for p in self.providers.values()))


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GatewayError(
            400,
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def _timeout(req: Request, payload: Payload) -> float | None:
    """The per-request timeout: header `x-lmgate-timeout`, else the body's `timeout` (removed)."""
    value: object = None
    if payload.data is not None and "timeout" in payload.data:
        value = payload.data.pop("timeout")
        payload.dirty = True
    if req.timeout_header is not None:
        value = req.timeout_header.decode("latin-1")
    if value is None:
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 < seconds <= _MAX_TIMEOUT or isinstance(value, bool):
        raise GatewayError(
            400,
            f"Invalid timeout {value!r}: give seconds, above 0 and at most {_MAX_TIMEOUT:g}.",
            param="timeout",
            code="invalid_timeout",
        )
    return seconds


def _with_query(req: Request, suffix: str) -> str:
    qs: bytes = req.scope.get("query_string", b"")
    return f"{suffix}?{qs.decode('latin-1')}" if qs else suffix


def _model_forbidden(model: str) -> GatewayError:
    return GatewayError(
        403,
        f"Your API key is not allowed to use the model {model!r}.",
        param="model",
        code="model_not_allowed",
    )


def _model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model {model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def create_app() -> Gateway:
    """uvicorn factory for worker processes: the configuration file is in `LMGATE_CONFIG`."""
    from lmgate.config.loader import load_config

    config = load_config(os.environ["LMGATE_CONFIG"])
    listen = os.environ.get("LMGATE_LISTEN")
    if listen:  # `lmgate serve --host/--port` given on the command line
        host, _, port = listen.rpartition(":")
        config.server.host, config.server.port = host, int(port)
    return Gateway(config)
