"""OpenAI and Anthropic server-sent events: decoding upstream streams, writing OpenAI chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmgate.adapters.base import Context

DONE = b"data: [DONE]\n\n"


def sse(obj: object) -> bytes:
    """One OpenAI SSE event."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass(slots=True)
class ChunkWriter:
    """Builds a stream's OpenAI chunks (chat or legacy completions) for one request."""

    ctx: Context
    started: bool = False
    out: list[bytes] = field(default_factory=list)

    def _chat(self, delta: dict[str, Any], finish_reason: str | None) -> None:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        self._emit([choice])

    def _emit(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> None:
        ctx = self.ctx
        obj: dict[str, Any] = {
            "id": ctx.id,
            "object": "chat.completion.chunk" if ctx.kind == "chat" else "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
        }
        if ctx.include_usage:
            obj["usage"] = usage
        self.out.append(sse(obj))

    def start(self) -> None:
        """The first chat chunk (the assistant role), once."""
        if not self.started:
            self.started = True
            if self.ctx.kind == "chat":
                self._chat({"role": "assistant", "content": ""}, None)

    def text(self, text: str) -> None:
        """A content delta."""
        if not text:
            return
        self.start()
        if self.ctx.kind == "chat":
            self._chat({"content": text}, None)
        else:
            self._emit([{"text": text, "index": 0, "logprobs": None, "finish_reason": None}])

    def tool_call(self, index: int, fn: dict[str, str], call_id: str | None = None) -> None:
        """A tool call delta: the start (with id and name) or more of its arguments.

        Legacy completions have no tool calls: nothing is written for them.
        """
        if self.ctx.kind != "chat":
            return
        self.start()
        call: dict[str, Any] = {"index": index, "function": fn}
        if call_id is not None:
            call.update(id=call_id, type="function")
        self._chat({"tool_calls": [call]}, None)

    def end(self, finish_reason: str, usage: dict[str, Any] | None) -> None:
        """The finish chunk, and the usage chunk when the client asked for it."""
        self.start()
        if self.ctx.kind == "chat":
            self._chat({}, finish_reason)
        else:
            self._emit([{"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason}])
        if self.ctx.include_usage and usage is not None:
            self._emit([], usage)

    def error(self, envelope: dict[str, Any]) -> None:
        """An error event (the stream ends with it)."""
        self.out.append(sse(envelope))

    def take(self) -> bytes:
        """The bytes written since the last call."""
        data = b"".join(self.out)
        self.out.clear()
        return data


class SSEDecoder:
    """Splits an SSE byte stream into (event, data) pairs, whatever the chunk boundaries."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        """The events completed by `chunk`."""
        data = (self._buf + chunk).replace(b"\r\n", b"\n")
        if data.endswith(b"\r"):  # maybe half of a CRLF: wait for the rest
            data, self._buf = data[:-1], b"\r"
        else:
            self._buf = b""
        *events, rest = data.split(b"\n\n")
        self._buf = rest + self._buf
        for raw in events:
            parsed = _parse_event(raw)
            if parsed is not None:
                yield parsed

    def flush(self) -> Iterator[tuple[str, str]]:
        """An unterminated last event, at the end of the stream."""
        raw, self._buf = self._buf.replace(b"\r", b""), b""
        parsed = _parse_event(raw) if raw.strip() else None
        if parsed is not None:
            yield parsed


def _parse_event(raw: bytes) -> tuple[str, str] | None:
    event, data = "message", []
    for line in raw.decode("utf-8", "replace").split("\n"):
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return (event, "\n".join(data)) if data else None
