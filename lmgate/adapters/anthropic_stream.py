"""Anthropic's answers as OpenAI's: the event stream, usage, stop reasons and errors.

A Messages stream is a sequence of SSE events: `message_start` (the message with its input
usage), for each content block `content_block_start`, `content_block_delta`s (`text_delta`,
`input_json_delta` for tool input, `thinking_delta`...) and `content_block_stop`, then
`message_delta` (stop reason and cumulative usage) and `message_stop`; `ping` may come at
any time and `error` ends a stream that failed. `AnthropicStream` turns them into
`chat.completion.chunk`s; `MessagesUsage` only reads the usage, for a native stream relayed
as is.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmgate.adapters.base import Context, openai_error, usage_object
from lmgate.adapters.sse import DONE, ChunkWriter, SSEDecoder

__all__ = [
    "STOP_REASONS",
    "AnthropicStream",
    "MessagesUsage",
    "anthropic_error",
    "openai_usage",
    "usage_from_message",
]

STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic's error types as OpenAI's (status, type, code); others keep their status.
ERRORS = {
    "invalid_request_error": (400, "invalid_request_error", None),
    "authentication_error": (401, "authentication_error", "invalid_api_key"),
    "permission_error": (403, "permission_error", None),
    "not_found_error": (404, "invalid_request_error", "model_not_found"),
    "request_too_large": (413, "invalid_request_error", "request_too_large"),
    "rate_limit_error": (429, "rate_limit_error", "rate_limit_exceeded"),
    "api_error": (500, "server_error", None),
    "overloaded_error": (503, "server_error", "overloaded"),
}


def openai_usage(usage: object) -> dict[str, Any] | None:
    """Anthropic's usage as OpenAI's: prompt = input + cache reads + cache writes."""
    if not isinstance(usage, dict):
        return None

    def n(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) else 0

    cached = n("cache_read_input_tokens")
    prompt = n("input_tokens") + cached + n("cache_creation_input_tokens")
    return usage_object(prompt, n("output_tokens"), cached)


def anthropic_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An Anthropic error answer (`{"type": "error", "error": {...}}`) as OpenAI's."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(error, dict):
        text = body[:500].decode("utf-8", "replace").strip()
        return openai_error(status, text or f"Anthropic answered {status}.")
    return openai_error_from(status, error)


def openai_error_from(status: int, error: dict[str, Any]) -> tuple[int, bytes]:
    """Anthropic's `error` object as OpenAI's envelope and status."""
    kind = str(error.get("type"))
    mapped_status, etype, code = ERRORS.get(kind, (status, None, None))
    if kind != "overloaded_error" and status >= 400:
        mapped_status = status
    message = str(error.get("message") or f"Anthropic answered {status}.")
    return openai_error(mapped_status, message, type=etype, code=code)


def usage_from_message(body: bytes) -> dict[str, Any] | None:
    """The OpenAI usage of a native (unconverted) Messages answer, for the ledger."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return openai_usage(obj.get("usage")) if isinstance(obj, dict) else None


class _UsageCounter:
    """A stream's usage: `message_start` gives the input, `message_delta` cumulative totals."""

    __slots__ = ("seen", "tokens")

    def __init__(self) -> None:
        self.tokens: dict[str, int] = {}
        self.seen = False

    def update(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.seen = True
            self.tokens.update({k: v for k, v in usage.items() if isinstance(v, int)})

    def openai(self) -> dict[str, Any] | None:
        return openai_usage(self.tokens) if self.seen else None


class MessagesUsage:
    """Reads the usage of a native Messages stream relayed as is (the bytes are not changed)."""

    __slots__ = ("_counter", "_decoder")

    def __init__(self) -> None:
        self._decoder = SSEDecoder()
        self._counter = _UsageCounter()

    def feed(self, chunk: bytes) -> None:
        """Scan the next bytes of the stream."""
        for _, data in self._decoder.feed(chunk):
            if '"usage"' in data:
                obj = orjson.loads(data)
                self._counter.update(obj.get("message", obj).get("usage"))

    @property
    def usage(self) -> dict[str, Any] | None:
        """The OpenAI usage seen so far, or None."""
        return self._counter.openai()


class AnthropicStream:
    """Converts a Messages event stream into OpenAI chunks (chat or legacy completions)."""

    def __init__(self, ctx: Context) -> None:
        self.complete = False
        self.error: dict[str, Any] | None = None
        self._ctx = ctx
        self._writer = ChunkWriter(ctx)
        self._decoder = SSEDecoder()
        self._usage = _UsageCounter()
        self._tools: dict[int, int] = {}
        """Content block index -> OpenAI tool call index, for tool_use blocks."""
        self._reason = "stop"

    def feed(self, chunk: bytes) -> bytes:
        """The chunks for the events completed by `chunk`."""
        for _, data in self._decoder.feed(chunk):
            self._event(data)
        return self._writer.take()

    def finish(self) -> bytes:
        """The rest and `[DONE]`; nothing more if the stream failed or never ended."""
        for _, data in self._decoder.flush():
            self._event(data)
        out = self._writer.take()
        return out + DONE if self.complete else out

    def _event(self, data: str) -> None:
        if self.complete or self.error is not None:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict):
            return
        kind, writer = obj.get("type"), self._writer
        if kind == "message_start":
            self._usage.update((obj.get("message") or {}).get("usage"))
            writer.start()
        elif kind == "content_block_start":
            self._block_start(obj.get("index"), obj.get("content_block") or {})
        elif kind == "content_block_delta":
            self._delta(obj.get("index"), obj.get("delta") or {})
        elif kind == "message_delta":
            reason = (obj.get("delta") or {}).get("stop_reason")
            self._reason = STOP_REASONS.get(str(reason), "stop")
            self._usage.update(obj.get("usage"))
        elif kind == "message_stop":
            self.complete = True
            reason = self._reason
            if self._ctx.kind != "chat" and reason == "tool_calls":
                reason = "stop"
            writer.end(reason, self._usage.openai())
        elif kind == "error":
            error = obj.get("error")
            _, body = openai_error_from(500, error if isinstance(error, dict) else {})
            self.error = orjson.loads(body)
            writer.error(self.error)

    def _block_start(self, index: object, block: dict[str, Any]) -> None:
        if block.get("type") == "text":
            self._writer.text(str(block.get("text") or ""))
        elif block.get("type") == "tool_use" and isinstance(index, int):
            k = self._tools[index] = len(self._tools)
            fn = {"name": str(block.get("name")), "arguments": ""}
            self._writer.tool_call(k, fn, str(block.get("id")))
            if block.get("input"):
                self._writer.tool_call(k, {"arguments": orjson.dumps(block["input"]).decode()})

    def _delta(self, index: object, delta: dict[str, Any]) -> None:
        if delta.get("type") == "text_delta":
            self._writer.text(str(delta.get("text") or ""))
        elif delta.get("type") == "input_json_delta" and index in self._tools:
            partial = str(delta.get("partial_json") or "")
            if partial:
                assert isinstance(index, int)
                self._writer.tool_call(self._tools[index], {"arguments": partial})
