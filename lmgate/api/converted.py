"""Attempts on providers that do not speak OpenAI's API (ARGO, Anthropic).

`forward` keeps its own pass-through for OpenAI-compatible providers and asks `steps` for the
others: how to open the upstream request, relay its answer and read its errors. Either the
provider's adapter converts the OpenAI request and its answer (`Conversion`), or the request
is already in the provider's own format (`/v1/messages` on Anthropic, ARGO's `/v1/chat`...)
and passes through as is (`NATIVE`). Nothing here runs for an OpenAI-compatible provider.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lmgate.adapters.base import Adapter, Context, StreamConverter, UpstreamCall
from lmgate.api import relay
from lmgate.api.errors import GatewayError
from lmgate.api.http import JSON, ClientGone, Request
from lmgate.routing.deployment import Deployment
from lmgate.upstream.client import UpstreamError, UpstreamResponse

log = logging.getLogger("lmgate.relay")

_SSE_TYPE = b"text/event-stream; charset=utf-8"
_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


def steps(call: relay.Call, payload: relay.Payload, dep: Deployment) -> relay.Steps:
    """How to make one attempt on `dep`, whose provider is not OpenAI-compatible."""
    provider = dep.provider
    if call.api != "openai":
        if call.api != provider.config.type:
            raise GatewayError(
                400,
                f"Provider {provider.name!r} speaks the {provider.config.type} API, "
                f"not the {call.api} API of this request.",
                code="unsupported_path",
            )
        return NATIVE
    if call.kind is None or payload.data is None:
        path = call.suffix.split("?")[0]
        raise GatewayError(
            400,
            f"Provider {provider.name!r} speaks the {provider.config.type} API, which lmgate "
            f"converts for /v1/chat/completions, /v1/completions and /v1/embeddings only, "
            f"not for /v1{path}.",
            code="unsupported_path",
        )
    return Conversion(call, payload, dep).steps


class Conversion:
    """One attempt converted by the provider's adapter: OpenAI's API outside, its own inside."""

    __slots__ = ("adapter", "ctx", "up")

    def __init__(self, call: relay.Call, payload: relay.Payload, dep: Deployment) -> None:
        data = payload.data
        kind = call.kind
        assert data is not None and kind is not None
        asked = data.get("model")
        model = payload.model or (asked if isinstance(asked, str) else "")
        self.adapter: Adapter = dep.provider.adapter
        self.up: UpstreamCall = self.adapter.build(
            kind, data, dep.upstream_model or model, call.user
        )
        # After `Accounting.meter()`, which may have asked for the usage chunk: the
        # converter then writes one, and the meter strips it again.
        self.ctx = Context.for_request(kind, data, model)

    @property
    def steps(self) -> relay.Steps:
        return self.open, self.relay, self.error

    async def open(
        self, req: Request, call: relay.Call, payload: relay.Payload, dep: Deployment
    ) -> UpstreamResponse:
        up = self.up
        headers = {"x-request-id": req.request_id.decode(), **up.headers}
        return await dep.provider.request(
            up.method, up.suffix, up.body or None, headers, call.timeout
        )

    async def error(self, resp: UpstreamResponse, dep: Deployment) -> GatewayError:
        """The upstream's error, converted to OpenAI's, as the gateway reports upstream errors."""
        try:
            raw = await resp.read()
        except UpstreamError:
            raw = b""
        status, body = self.adapter.response(self.ctx.kind, resp.status, raw, self.ctx)
        return relay._error_from(status, body, resp.headers, dep)

    async def relay(
        self, req: Request, call: relay.Call, resp: UpstreamResponse, dep: Deployment
    ) -> None:
        if resp.status >= 400:
            raise await self.error(resp, dep)
        ctx = self.ctx
        if self.up.stream:
            converter = self.adapter.stream(ctx.kind, ctx)
            await stream(req, call, resp, dep, converter, _SSE_TYPE)
            return
        try:
            body = await resp.read()
        except TimeoutError:
            raise relay._timeout_error(dep) from None
        except UpstreamError:
            raise relay._broken(dep) from None
        status, body = self.adapter.response(ctx.kind, resp.status, body, ctx)
        if status >= 400:
            raise relay._error_from(status, body, {}, dep)
        extra = call.observer.body(body) if call.observer is not None else None
        if call.headers:
            extra = [*call.headers, *(extra or ())]
        await req.respond(status, body, JSON, extra)


async def stream(
    req: Request,
    call: relay.Call,
    resp: UpstreamResponse,
    dep: Deployment,
    converter: StreamConverter,
    content_type: bytes,
) -> None:
    """Relay a converted stream as it arrives; stop the upstream as soon as the client leaves.

    The converter's `complete` replaces the `[DONE]` check of the pass-through: an upstream
    error event was already converted and sent (`error`); a stream that simply stopped gets
    the gateway's error event.
    """
    send = req.send
    observer = call.observer
    watcher = asyncio.ensure_future(relay._disconnected(req.receive))
    watcher.add_done_callback(lambda t: None if t.cancelled() else resp.close())
    started = False
    failure: GatewayError | None = None
    try:
        async for piece in resp.chunks():
            out = converter.feed(piece)
            if observer is not None and out:
                out = observer.chunk(out)
            if not out:
                continue
            if not started:
                await relay.start_stream(req, resp.status, call.headers, content_type)
                started = True
            await send({"type": "http.response.body", "body": out, "more_body": True})
        out = converter.finish()
        if observer is not None:
            out = (observer.chunk(out) if out else b"") + observer.chunk(b"")
        if out:
            if not started:
                await relay.start_stream(req, resp.status, call.headers, content_type)
                started = True
            await send({"type": "http.response.body", "body": out, "more_body": True})
        if converter.error is not None:
            if observer is not None:
                observer.failed(_reported(converter.error, dep))
        elif not converter.complete:
            failure = relay._broken(dep)
    except UpstreamError as e:
        if watcher.done():
            raise ClientGone from None  # the upstream connection is already closed
        failure = relay._timeout_error(dep) if isinstance(e, TimeoutError) else relay._broken(dep)
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("stream from %s could not be converted", dep.label, exc_info=True)
        failure = GatewayError(
            502,
            f"Provider {dep.provider.name!r} sent a stream that could not be read.",
            code="bad_upstream",
        )
    finally:
        watcher.cancel()
    await relay.end_stream(req, call, dep, resp.status, failure, started, content_type)


def _reported(envelope: dict[str, Any], dep: Deployment) -> GatewayError:
    """The upstream's mid-stream error event (already sent to the client), for the ledger."""
    error = envelope.get("error")
    error = error if isinstance(error, dict) else {}
    code = error.get("code")
    return GatewayError(
        502,
        str(error.get("message") or f"Provider {dep.provider.name!r} failed mid-stream."),
        code=str(code) if code is not None else "upstream_error",
    )


# -- native requests: the provider's own format, passed through -------------------------------


class _Plain:
    """A plain-text stream (ARGO's `/streamchat/`) passed on unchanged."""

    def __init__(self) -> None:
        self.complete = True  # plain text has no end marker
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


async def _native_relay(
    req: Request, call: relay.Call, resp: UpstreamResponse, dep: Deployment
) -> None:
    """The pass-through's relay, and plain-text streams relayed as they arrive."""
    content_type = resp.headers.get("content-type", "")
    if resp.status < 400 and content_type.startswith("text/plain"):
        await stream(req, call, resp, dep, _Plain(), content_type.encode("latin-1"))
    else:
        await relay._relay(req, call, resp, dep)


NATIVE: relay.Steps = (relay._open, _native_relay, relay._upstream_error)
"""A request already in the provider's own format: the body and the answer as they are."""
