"""Forward a request to a deployment and relay the answer: retries, streams, upstream errors."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from lmgate.api.errors import GatewayError, sse_error_event
from lmgate.api.http import ClientGone, Headers, Message, Receive, Request
from lmgate.config.schema import RoutingSettings
from lmgate.routing.deployment import Deployment, Slots, attempt_order
from lmgate.upstream.client import BodyBroken, ConnectFailed, UpstreamError, UpstreamResponse

log = logging.getLogger("lmgate.relay")

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})  # 529: Anthropic overloaded
_URL = re.compile(r"https?://[^\s\"'<>]+")
_SSE = b"text/event-stream"
_SSE_TYPE = b"text/event-stream; charset=utf-8"


@dataclass(slots=True)
class Payload:
    """A request body: passed through as received unless a deployment needs it rewritten."""

    raw: bytes | None
    data: dict[str, object] | None = None
    model: str | None = None
    dirty: bool = False
    """True when the body was changed (a gateway-only field removed) and must be re-encoded."""

    def for_deployment(self, dep: Deployment) -> bytes | None:
        """The bytes to send to `dep`: the original ones whenever nothing has to change."""
        target = dep.upstream_model
        if self.data is None or ((target is None or target == self.model) and not self.dirty):
            return self.raw
        if target is None or target == self.model:
            return orjson.dumps(self.data)
        return orjson.dumps({**self.data, "model": target})


class Observer(Protocol):
    """Sees what a request's upstream answered, without knowing how to reach it.

    Accounting implements it; the relay calls it on the hot path, so each hook must be cheap.
    """

    def attempt(self, dep: Deployment) -> None:
        """The request is about to be sent to `dep` (again, on a retry)."""

    def answered(self, dep: Deployment, status: int) -> None:
        """A deployment answered with `status` (called again if a retry goes elsewhere)."""

    def body(self, body: bytes) -> Headers | None:
        """A complete non-streaming 2xx body; returns extra response headers."""

    def chunk(self, chunk: bytes) -> bytes:
        """A stream's chunk; returns the bytes to forward (usually `chunk` itself).

        Called once more with `b""` when the stream ends, to release anything held back.
        """
        return chunk

    def failed(self, error: GatewayError) -> None:
        """The stream broke after it started; the client got `error` as its last event."""


class Observers:
    """Two observers as one: the first sees stream chunks before the second may strip them."""

    __slots__ = ("first", "second")

    def __init__(self, first: Observer, second: Observer) -> None:
        self.first, self.second = first, second

    def attempt(self, dep: Deployment) -> None:
        self.first.attempt(dep)
        self.second.attempt(dep)

    def answered(self, dep: Deployment, status: int) -> None:
        self.first.answered(dep, status)
        self.second.answered(dep, status)

    def body(self, body: bytes) -> Headers | None:
        self.first.body(body)
        return self.second.body(body)

    def chunk(self, chunk: bytes) -> bytes:
        return self.second.chunk(self.first.chunk(chunk))

    def failed(self, error: GatewayError) -> None:
        self.first.failed(error)
        self.second.failed(error)


@dataclass(slots=True)
class Call:
    """What to send upstream, apart from the body."""

    method: str
    suffix: str
    """The path after the provider's base URL, e.g. `/chat/completions?x=1`."""
    timeout: float | None
    expects_done: bool = False
    """An OpenAI chat/completions stream: it must end with `data: [DONE]`."""
    content_type: bytes | None = None
    observer: Observer | None = None
    headers: Headers | None = None
    """Extra response headers (rate limits, cache status)."""
    tokens: int | None = None
    """Prompt + completion tokens, once known (for token rate limits)."""
    kind: str | None = None
    """`chat`, `completions` or `embeddings`: what a provider's adapter converts."""
    user: str | None = None
    """The caller's lmgate user name (ARGO may be told it)."""
    api: str = "openai"
    """The API of the body and answer: `openai`, or a provider's own (`anthropic`, `argo`)."""
    slots: Slots | None = None
    """Where deployments' `max_inflight` is counted across replicas (Redis), if anywhere."""


Opener = Callable[[Request, Call, Payload, Deployment], Awaitable[UpstreamResponse]]
Relayer = Callable[[Request, Call, UpstreamResponse, Deployment], Awaitable[None]]
ErrorReader = Callable[[UpstreamResponse, Deployment], Awaitable[GatewayError]]
Steps = tuple[Opener, Relayer, ErrorReader]
"""How an attempt is made: open the upstream request, relay its answer, read its error."""


async def forward(
    req: Request, call: Call, payload: Payload, deployments: list[Deployment], rs: RoutingSettings
) -> None:
    """Send the request to the best deployment, falling over to others before any byte is sent.

    Connection failures are retried (on the same deployment when it is the only one); 429 and
    5xx answers only move on to another deployment. A timeout is never retried: the upstream
    may still be working on the request.
    """
    order = attempt_order(deployments, rs.retries + 1)
    if not order:
        raise _busy()
    if len(order) == 1 and rs.retries:
        order = [order[0], order[0]]
    last: GatewayError | None = None
    for i, dep in enumerate(order):
        next_dep = order[i + 1] if i + 1 < len(order) else None
        slots = call.slots if dep.max_inflight is not None else None
        if slots is None:
            last = await _attempt(req, call, payload, dep, next_dep, rs)
        elif await slots.take_slot(dep, req.record_id.decode()):
            try:
                last = await _attempt(req, call, payload, dep, next_dep, rs)
            finally:
                slots.free_slot(dep, req.record_id.decode())
        else:  # every slot taken, by this replica or others
            last = last or _busy()
            continue
        if last is None:
            return
    assert last is not None
    raise last


async def _attempt(
    req: Request,
    call: Call,
    payload: Payload,
    dep: Deployment,
    next_dep: Deployment | None,
    rs: RoutingSettings,
) -> GatewayError | None:
    """One try on `dep`: None once the answer is relayed, else the error that moves on."""
    # Other APIs than OpenAI's (ARGO, Anthropic) take their own steps, never this path's.
    opener, relay, upstream_error = (
        _DIRECT if dep.provider.passthrough else converted.steps(call, payload, dep)
    )
    dep.inflight += 1
    if call.observer is not None:
        call.observer.attempt(dep)
    try:
        resp = await opener(req, call, payload, dep)
    except (ConnectFailed, BodyBroken) as e:
        dep.inflight -= 1
        dep.failed(rs.allowed_fails, rs.cooldown)
        log.warning("upstream %s failed: %s", dep.label, e)
        if isinstance(e, BodyBroken):
            return _broken(dep)
        return GatewayError(
            502, f"Could not reach provider {dep.provider.name!r}.", code="upstream_unreachable"
        )
    except TimeoutError:
        dep.inflight -= 1
        raise _timeout_error(dep) from None
    if call.observer is not None:
        call.observer.answered(dep, resp.status)
    try:
        if resp.status in RETRYABLE_STATUS:
            dep.failed(rs.allowed_fails, rs.cooldown)
            if next_dep is not None and next_dep is not dep:
                return await upstream_error(resp, dep)
        elif resp.status < 400:
            dep.succeeded()
        await relay(req, call, resp, dep)
        return None
    finally:
        dep.inflight -= 1
        resp.release()


def _busy() -> GatewayError:
    return GatewayError(
        429,
        "Every deployment of this model is at its limit of requests in flight; try again shortly.",
        code="deployment_busy",
        type="requests",
        headers={"Retry-After": "1"},
    )


async def _open(req: Request, call: Call, payload: Payload, dep: Deployment) -> UpstreamResponse:
    headers = {"x-request-id": req.request_id.decode()}
    if call.content_type is not None:
        headers["content-type"] = call.content_type.decode("latin-1")
    return await dep.provider.request(
        call.method, call.suffix, payload.for_deployment(dep), headers, call.timeout
    )


async def _relay(req: Request, call: Call, resp: UpstreamResponse, dep: Deployment) -> None:
    if resp.status >= 400:
        raise await _upstream_error(resp, dep)
    content_type = resp.headers.get("content-type", "application/json").encode("latin-1")
    if content_type.startswith(_SSE):
        await _relay_stream(req, call, resp, dep)
        return
    try:
        body = await resp.read()
    except TimeoutError:
        raise _timeout_error(dep) from None
    except UpstreamError:
        raise _broken(dep) from None
    extra = call.observer.body(body) if call.observer is not None else None
    if call.headers:
        extra = [*call.headers, *(extra or ())]
    await req.respond(resp.status, body, content_type, extra)


async def _relay_stream(req: Request, call: Call, resp: UpstreamResponse, dep: Deployment) -> None:
    """Relay SSE bytes as they arrive; stop the upstream as soon as the client leaves.

    The response starts with the first chunk, so that a failure before it is still an ordinary
    error response, and the client gets headers and first token in one write.
    """
    send = req.send
    observer = call.observer
    watcher = asyncio.ensure_future(_disconnected(req.receive))
    watcher.add_done_callback(lambda t: None if t.cancelled() else resp.close())
    started = False
    tail = b""
    failure: GatewayError | None = None
    try:
        async for chunk in resp.chunks():
            tail = (tail + chunk)[-32:]
            if observer is not None:
                chunk = observer.chunk(chunk)
                if not chunk:
                    continue
            if not started:
                await start_stream(req, resp.status, call.headers)
                started = True
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        rest = observer.chunk(b"") if observer is not None else b""
        if rest:
            if not started:
                await start_stream(req, resp.status, call.headers)
                started = True
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        if call.expects_done and not tail.rstrip().endswith(b"[DONE]"):
            failure = _broken(dep)
    except UpstreamError as e:
        if watcher.done():
            raise ClientGone from None  # the upstream connection is already closed
        failure = _timeout_error(dep) if isinstance(e, TimeoutError) else _broken(dep)
    finally:
        watcher.cancel()
    await end_stream(req, call, dep, resp.status, failure, started)


async def end_stream(
    req: Request,
    call: Call,
    dep: Deployment,
    status: int,
    failure: GatewayError | None,
    started: bool,
    content_type: bytes = _SSE_TYPE,
) -> None:
    """Close a relayed stream: a broken one ends with an error event (or, if nothing was
    sent yet, raises the error for an ordinary error response)."""
    if failure is not None:
        log.warning("stream from %s broke: %s", dep.label, failure.message)
        if not started:
            raise failure
        if call.observer is not None:
            call.observer.failed(failure)
        event = sse_error_event(failure)
        await req.send({"type": "http.response.body", "body": event, "more_body": True})
    if not started:
        await start_stream(req, status, call.headers, content_type)
    await req.send({"type": "http.response.body", "body": b"", "more_body": False})


async def start_stream(
    req: Request, status: int, extra: Headers | None, content_type: bytes = _SSE_TYPE
) -> None:
    """The response head of a stream."""
    headers: Headers = [
        (b"content-type", content_type),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", req.request_id),
    ]
    if extra:
        headers.extend(extra)
    await req.send({"type": "http.response.start", "status": status, "headers": headers})


async def _disconnected(receive: Receive) -> Message:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return message


async def _upstream_error(resp: UpstreamResponse, dep: Deployment) -> GatewayError:
    """The upstream's error as OpenAI's envelope, without credentials or internal addresses."""
    try:
        raw = await resp.read()
    except UpstreamError:
        raw = b""
    return _error_from(resp.status, raw, resp.headers, dep)


def _error_from(
    status: int, raw: bytes, upstream_headers: dict[str, str], dep: Deployment
) -> GatewayError:
    """An upstream error body in OpenAI's envelope, as the gateway reports it."""
    provider = dep.provider
    message, etype, param, code = f"Provider {provider.name!r} answered {status}.", None, None, None
    try:
        err = orjson.loads(raw)["error"]
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            etype, param, code = err.get("type"), err.get("param"), err.get("code")
        elif isinstance(err, str):
            message = err
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = raw[:500].decode("utf-8", "replace").strip()
        if text:
            message = f"{message} {text}"
    message = _URL.sub("<upstream>", provider.scrub(message))
    headers = {}
    if status in (401, 403):
        # The provider refused the gateway's own credentials: not the client's fault.
        status, code = 502, "upstream_auth_failed"
        message = f"Provider {provider.name!r} rejected the gateway's credentials."
        etype = "upstream_error"
    elif "retry-after" in upstream_headers:
        headers["Retry-After"] = upstream_headers["retry-after"]
    return GatewayError(
        status,
        message,
        type=etype if isinstance(etype, str) else None,
        param=param if isinstance(param, str) else None,
        code=str(code) if code is not None else None,
        headers=headers,
    )


def _timeout_error(dep: Deployment) -> GatewayError:
    return GatewayError(
        504, f"Provider {dep.provider.name!r} did not answer in time.", code="timeout"
    )


def _broken(dep: Deployment) -> GatewayError:
    return GatewayError(
        502,
        f"The connection to provider {dep.provider.name!r} broke before the response finished.",
        code="upstream_disconnected",
    )


_DIRECT: Steps = (_open, _relay, _upstream_error)
"""The OpenAI-compatible pass-through."""

# The conversions build on this module's functions: imported once they are all defined.
from lmgate.api import converted  # noqa: E402
