"""The ASGI request as the hot path sees it, and the few ways it answers."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from lmgate.api.errors import GatewayError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json"
_MAX_REQUEST_ID = 128
_MAX_RECORD_ID = 128
"""The ledger's `request_id` column."""
_tag = os.urandom(4).hex()
_counter = itertools.count()


def _retag() -> None:
    global _tag, _counter
    _tag, _counter = os.urandom(4).hex(), itertools.count()


os.register_at_fork(after_in_child=_retag)


def new_request_id() -> bytes:
    """A request id unique across processes and replicas (a random tag per process and a
    counter) that grows with time, so that the ledger's unique index is appended to, not
    written all over: about half the insert cost of a random id. No system call either."""
    count = next(_counter) & 0xFFFFFFFFFFFF
    return f"{time.time_ns() // 1_000_000:012x}{_tag}{count:012x}".encode()


class ClientGone(Exception):
    """The client disconnected before the gateway answered."""


class Request:
    """One HTTP request: the headers the gateway reads, parsed once, and its body."""

    __slots__ = (
        "api_key",
        "content_length",
        "content_type",
        "method",
        "path",
        "receive",
        "record_id",
        "request_id",
        "scope",
        "send",
        "timeout_header",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        request_id = content_length = content_type = timeout = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                api_key = token.strip() if scheme.lower() == b"bearer" else None
            elif name == b"api-key":
                api_key = value.strip()
            elif name == b"content-length":
                content_length = value
            elif name == b"content-type":
                content_type = value
            elif name == b"x-request-id":
                request_id = value
            elif name == b"x-lmgate-timeout":
                timeout = value
            elif name == b"x-api-key":  # Anthropic's SDK
                api_key = value.strip()
        self.api_key: bytes | None = api_key
        """The caller's key: `Authorization: Bearer`, `api-key`, `x-api-key`, or the path."""
        self.content_length = content_length
        self.content_type = content_type
        self.timeout_header = timeout
        own = new_request_id()
        self.request_id: bytes = own
        """The client's `x-request-id` if it sent one, else the gateway's own."""
        self.record_id: bytes = own
        """Unique per request even when clients reuse ids: the ledger's key."""
        if request_id and len(request_id) <= _MAX_REQUEST_ID and request_id.isascii():
            self.request_id = request_id
            self.record_id = request_id[: _MAX_RECORD_ID - len(own) - 1] + b"." + own

    def header(self, name: bytes) -> bytes | None:
        """A header the hot path does not read up front (names are lower-case)."""
        for key, value in self.scope["headers"]:
            if key == name:
                return bytes(value)
        return None

    async def body(self, limit: int) -> bytes:
        """The whole body; 413 past `limit` bytes, ClientGone if the client left."""
        if self.content_length is not None:
            try:
                declared = int(self.content_length)
            except ValueError:
                raise GatewayError(400, "Invalid Content-Length header.") from None
            if declared > limit:
                raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def respond(
        self, status: int, body: bytes, content_type: bytes = JSON, extra: Headers | None = None
    ) -> None:
        """Send a complete response."""
        headers: Headers = [(b"content-type", content_type), (b"x-request-id", self.request_id)]
        if extra:
            headers.extend(extra)
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def fail(self, err: GatewayError) -> None:
        """Answer with an error in OpenAI's envelope."""
        extra = [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await self.respond(err.status, err.body(), extra=extra)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body too large: the limit is {limit} bytes.",
        code="request_too_large",
    )
