"""The Anthropic-compatible entrance, `POST /v1/messages`: what it sends upstream, and how.

A model whose every deployment is on an Anthropic provider gets the request as it came (the
model renamed to the upstream's name) and answers in its own format; the meter reads
Anthropic's usage. Any other model gets it converted into an OpenAI chat request, forwarded
as `/v1/chat/completions` is (and converted again for an ARGO deployment); the answer is
converted back on its way to the client, after the meter has read the OpenAI bytes.
`MessagesSend` does that last step, and gives every error Anthropic's format.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from lmgate.adapters.messages_entrance import (
    MessagesStreamFromOpenAI,
    anthropic_error_body,
    event,
    messages_error_from_openai,
    messages_response_from_openai,
    openai_request_from_messages,
)
from lmgate.api.http import JSON, Message, Send
from lmgate.api.relay import Call, Payload
from lmgate.routing.deployment import Deployment

log = logging.getLogger("lmgate")

_SSE = b"text/event-stream"
_ERROR_EVENT = b'data: {"error"'
"""How the relay's own error event (a stream that broke) starts."""
_MAX_HEAD = 64 * 1024
"""Bytes held back at most while looking for a native stream's `message_start`."""


def entrance_call(
    data: dict[str, Any],
    payload: Payload,
    deployments: list[Deployment],
    timeout: float | None,
    user: str | None,
) -> tuple[Call, Payload, bool]:
    """The call and body for a Messages request, and whether its answer must be converted."""
    if all(d.provider.config.type == "anthropic" for d in deployments):
        call = Call("POST", "/messages", timeout, content_type=JSON, api="anthropic", user=user)
        return call, payload, False
    body = openai_request_from_messages(data)
    call = Call(
        "POST",
        "/chat/completions",
        timeout,
        expects_done=body.get("stream") is True,
        content_type=JSON,
        kind="chat",
        user=user,
    )
    return call, Payload(orjson.dumps(body), body, payload.model), True


class MessagesSend:
    """The client's ASGI `send` on `/v1/messages`: every answer leaves in Anthropic's format.

    Error responses (the gateway's own, and the upstream's in OpenAI's envelope) become
    Anthropic's error envelope. With `convert`, OpenAI answers become a Message, and OpenAI
    streams Anthropic's event stream; without it (an Anthropic upstream) answers pass as they
    are, but for the model's name (the client's, not the upstream's, as in converted answers)
    and the error event the relay writes when a stream breaks.
    """

    __slots__ = (
        "_broken",
        "_head",
        "_held",
        "_send",
        "_start",
        "_stream",
        "_streaming",
        "convert",
        "model",
    )

    def __init__(self, send: Send) -> None:
        self._send = send
        self.model = ""
        """The model the client asked for, reported in converted answers."""
        self.convert = False
        self._start: Message | None = None
        self._held: list[bytes] = []
        self._streaming = False
        self._stream: MessagesStreamFromOpenAI | None = None
        self._broken = False
        self._head: bytes | None = b""
        """A native stream's bytes until its first event (`message_start`); None once renamed."""

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            content_type = next((v for k, v in message["headers"] if k == b"content-type"), b"")
            if message["status"] < 400 and content_type.startswith(_SSE):
                self._streaming = True
                self._stream = MessagesStreamFromOpenAI(self.model) if self.convert else None
                await self._send(message)
            else:
                self._start = message
            return
        if kind != "http.response.body":
            await self._send(message)
            return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self._streaming:
            out = self._stream_bytes(body, more)
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})
            return
        self._held.append(body)
        if not more:
            await self._complete(b"".join(self._held))

    async def _complete(self, body: bytes) -> None:
        start = self._start
        assert start is not None
        status: int = start["status"]
        if status >= 400:
            status, body = messages_error_from_openai(status, body)
        elif self.convert:
            try:
                body = messages_response_from_openai(body, self.model)
            except (ValueError, TypeError, AttributeError):
                log.warning("an answer for %s could not be converted", self.model, exc_info=True)
                status = 502
                body = anthropic_error_body(502, "The upstream's answer could not be read.")
        else:
            body = _renamed(body, self.model)
        await self._send({**start, "status": status})
        await self._send({"type": "http.response.body", "body": body})

    def _stream_bytes(self, body: bytes, more: bool) -> bytes:
        conv = self._stream
        if conv is None:  # native: only the relay's own error event is OpenAI's
            if body.startswith(_ERROR_EVENT):
                return _error_event(body)
            if self._head is None:
                return body
            head = self._head + body
            end = _event_end(head)
            if end < 0 and more and len(head) < _MAX_HEAD:
                self._head = head
                return b""
            self._head = None
            if end < 0:
                return head
            return _renamed_start(head[:end], self.model) + head[end:]
        if self._broken:
            return b""
        try:
            out = conv.feed(body) if body else b""
            if not more:
                out += conv.finish()
                if not conv.complete and conv.error is None:
                    out += _anthropic_error_event("The stream ended before the answer did.")
        except (ValueError, TypeError, AttributeError):
            log.warning("a stream for %s could not be converted", self.model, exc_info=True)
            self._broken = True
            return _anthropic_error_event("The upstream's stream could not be read.")
        return out


def _event_end(data: bytes) -> int:
    """Where the first SSE event of `data` ends (after its blank line); -1 if it has not."""
    lf, crlf = data.find(b"\n\n"), data.find(b"\r\n\r\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf + 2
    return crlf + 4 if crlf >= 0 else -1


def _renamed(body: bytes, model: str) -> bytes:
    """A native Message with the model's public name."""
    try:
        message = orjson.loads(body)
    except ValueError:
        return body
    if not isinstance(message, dict) or "model" not in message:
        return body
    message["model"] = model
    return orjson.dumps(message)


def _renamed_start(first: bytes, model: str) -> bytes:
    """A native stream's first event, `message_start`, with the model's public name."""
    lines = first.split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith(b"data:"):
            try:
                obj = orjson.loads(line[5:])
            except ValueError:
                return first
            if not isinstance(obj, dict) or obj.get("type") != "message_start":
                return first
            message = obj.get("message")
            if not isinstance(message, dict):
                return first
            message["model"] = model
            lines[i] = b"data: " + orjson.dumps(obj)
            return b"\n".join(lines)
    return first


def _error_event(body: bytes) -> bytes:
    """The relay's OpenAI error event as Anthropic's."""
    message = "The stream broke."
    try:
        error = orjson.loads(body[len(b"data: ") :]).get("error")
        message = str(error.get("message") or message)
    except (ValueError, AttributeError):
        pass
    return _anthropic_error_event(message)


def _anthropic_error_event(message: str) -> bytes:
    return event("error", orjson.loads(anthropic_error_body(500, message)))
