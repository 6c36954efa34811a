"""Deterministic stub of Anthropic's Messages API (``POST /v1/messages``), streaming or not.

Built from Anthropic's public API reference: requests need ``x-api-key`` or a bearer token
(when the stub has a key), ``anthropic-version``, ``model``, ``max_tokens`` and
``messages``; errors are ``{"type": "error", "error": {"type", "message"}}`` with
Anthropic's types (529 is ``overloaded_error``); streams are ``message_start``, ``ping``,
per content block ``content_block_start``/``content_block_delta``/``content_block_stop``,
then ``message_delta`` and ``message_stop``.

The reply is ``REPLY_PREFIX`` + the last user text (`` [images: N]`` appended when it had
images); after a ``tool_result`` it is ``Tool result: <its text>``. With tools, a
``tool_use`` block is answered when the last user text says ``use the tool NAME [with
{...}]``, when ``tool_choice`` is ``any`` or ``tool``, or when the body's ``stub`` object
has ``tool: true``. ``stub`` (or ``[stub key=value]`` in the text) also sets ``status`` (an
error) and ``error_after`` (a stream fails with an ``error`` event after that many deltas).

Tokens are words: input = words of the system prompt and all text (tool inputs and results
included) + 3 per message. Blocks marked ``cache_control`` make the prompt up to the last
marked one cacheable: the first request with that prefix writes it
(``cache_creation_input_tokens``), later ones read it (``cache_read_input_tokens``);
``input_tokens`` is the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from lmgate.testing.argo_stub import (
    RunningServer,
    StubStats,
    directives,
    pieces,
    run_forever,
    serve,
    tool_request,
    truncate,
)

REPLY_PREFIX = "This is lmgate's Anthropic stub answering: "
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass
class AnthropicStubOptions:
    """Server-wide behaviour: the required key, an error for every request, stream pacing."""

    name: str = "anthropic-stub"
    api_key: str | None = None
    fail_status: int | None = None
    chunk_delay: float = 0.0


class _Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message

    def response(self) -> web.Response:
        kind = ERROR_TYPES.get(self.status, "api_error")
        body = {"type": "error", "error": {"type": kind, "message": self.message}}
        return web.json_response(body, status=self.status, headers={"request-id": "req_stub"})


@dataclass(frozen=True, slots=True)
class _Answer:
    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None
    usage: dict[str, int]


class _AnthropicStub:
    def __init__(self, options: AnthropicStubOptions) -> None:
        self.options = options
        self.stats = StubStats()
        self._ids = itertools.count(1)
        self._cached: set[str] = set()

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = self._admit(request, await request.read())
            controls = {**directives(_last_user_text(body)), **_controls(body)}
            status = self.options.fail_status or _int(controls.get("status"))
            if status:
                raise _Error(status, f"stub error {status}")
            answer = self._answer(body, controls)
        except _Error as e:
            return e.response()
        message = {
            "id": f"msg_stub_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": answer.content,
            "stop_reason": answer.stop_reason,
            "stop_sequence": answer.stop_sequence,
            "usage": answer.usage,
        }
        if body.get("stream") is True:
            return await self._stream(request, message, _int(controls.get("error_after")))
        return web.json_response(message)

    def _admit(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Error(400, "The request body is not valid JSON.") from None
        self.stats.record(request, body)
        key = self.options.api_key
        sent = request.headers.get("x-api-key") or request.headers.get("authorization") or ""
        if key is not None and sent.removeprefix("Bearer ") != key:
            raise _Error(401, "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            raise _Error(400, "anthropic-version: header is required")
        if not isinstance(body, dict):
            raise _Error(400, "The request body must be an object.")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                raise _Error(400, f"{name}: Field required")
        if not isinstance(body["messages"], list) or not body["messages"]:
            raise _Error(400, "messages: at least one message is required")
        return body

    def _answer(self, body: dict[str, Any], controls: dict[str, Any]) -> _Answer:
        last = body["messages"][-1]
        blocks = _blocks(last.get("content"))
        results = [b for b in blocks if b.get("type") == "tool_result"]
        text = _last_user_text(body)
        call = _tool_call(body, text, controls)
        content: list[dict[str, Any]]
        if results:
            reply, why = "Tool result: " + _text(results[0].get("content")), "end"
        elif call is not None:
            reply, why = f"Calling {call['name']}.", "tool"
        else:
            images = sum(1 for b in blocks if b.get("type") == "image")
            reply = REPLY_PREFIX + text + (f" [images: {images}]" if images else "")
            reply, why = truncate(reply, body["max_tokens"], body.get("stop_sequences"))
        content = [{"type": "text", "text": reply}]
        if call is not None:
            content.append(call)
        stop, sequence = {"end": ("end_turn", None), "length": ("max_tokens", None)}.get(
            why, ("tool_use", None)
        )
        if why.startswith("stop:"):
            stop, sequence = "stop_sequence", why[5:]
        output = len(reply.split()) + (len(orjson.dumps(call["input"]).split()) if call else 0)
        return _Answer(
            content, stop, sequence, {**self._input_usage(body), "output_tokens": output}
        )

    def _input_usage(self, body: dict[str, Any]) -> dict[str, int]:
        """Input tokens, split into cache reads/writes at the last `cache_control` mark."""
        total = cacheable = 0
        prefix = hashlib.sha256()
        key = ""
        for marked, words, raw in _prompt_blocks(body):
            total += words
            prefix.update(raw)
            if marked:
                cacheable, key = total, prefix.hexdigest()
        read = write = 0
        if key in self._cached:
            read = cacheable
        elif key:
            self._cached.add(key)
            write = cacheable
        return {
            "input_tokens": total - cacheable,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
        }

    async def _stream(
        self, request: web.Request, message: dict[str, Any], error_after: int | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        usage = message["usage"]
        start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**usage, "output_tokens": 1}
        await _send(response, "message_start", {"type": "message_start", "message": start})
        await _send(response, "ping", {"type": "ping"})
        deltas = 0
        for index, block in enumerate(message["content"]):
            empty = {**block, "text": ""} if block["type"] == "text" else {**block, "input": {}}
            await _send(response, "content_block_start", _at(index, content_block=empty))
            for delta in _deltas(block):
                if error_after is not None and deltas >= error_after:
                    error = {"type": "overloaded_error", "message": "Overloaded"}
                    await _send(response, "error", {"type": "error", "error": error})
                    return response
                deltas += 1
                if self.options.chunk_delay:
                    await asyncio.sleep(self.options.chunk_delay)
                await _send(response, "content_block_delta", _at(index, delta=delta))
            await _send(response, "content_block_stop", _at(index))
        stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
        end = {
            "type": "message_delta",
            "delta": stop,
            "usage": {"output_tokens": usage["output_tokens"]},
        }
        await _send(response, "message_delta", end)
        await _send(response, "message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response


def _at(index: int, **fields: Any) -> dict[str, Any]:
    kind = next(iter(fields), "")
    names = {"content_block": "content_block_start", "delta": "content_block_delta"}
    return {"type": names.get(kind, "content_block_stop"), "index": index, **fields}


def _deltas(block: dict[str, Any]) -> list[dict[str, Any]]:
    if block["type"] == "text":
        return [{"type": "text_delta", "text": p} for p in pieces(block["text"], None)]
    raw = orjson.dumps(block["input"]).decode()
    third = max(len(raw) // 3, 1)
    parts = [raw[i : i + third] for i in range(0, len(raw), third)]
    return [{"type": "input_json_delta", "partial_json": p} for p in parts]


async def _send(response: web.StreamResponse, name: str, payload: dict[str, Any]) -> None:
    await response.write(b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")


def _controls(body: dict[str, Any]) -> dict[str, str]:
    """The body's `stub` object, as directive strings (`true` for booleans)."""
    stub = body.get("stub")
    if not isinstance(stub, dict):
        return {}
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in stub.items()}


def _int(value: object) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _blocks(content: object) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _text(content: object) -> str:
    return " ".join(str(b.get("text", "")) for b in _blocks(content) if b.get("type") == "text")


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body["messages"]):
        if isinstance(m, dict) and m.get("role") == "user":
            return _text(m.get("content"))
    return ""


def _tool_call(body: dict[str, Any], text: str, controls: dict[str, Any]) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "name" in t]
    choice = body.get("tool_choice") or {}
    if not tools or choice.get("type") == "none":
        return None
    asked = tool_request(text)
    forced = choice.get("type") in ("any", "tool") or controls.get("tool") == "true"
    if asked is None and not forced:
        return None
    name, arguments = asked or (choice.get("name") or tools[0]["name"], {})
    digest = hashlib.sha256(f"{name}{text}".encode()).hexdigest()[:20]
    return {"type": "tool_use", "id": f"toolu_stub_{digest}", "name": name, "input": arguments}


def _prompt_blocks(body: dict[str, Any]) -> list[tuple[bool, int, bytes]]:
    """Each prompt block's (has cache_control, word count, JSON), in prompt order."""
    out = []
    for b in _blocks(body.get("system")):
        out.append(("cache_control" in b, len(_text([b]).split()), orjson.dumps(b)))
    for m in body["messages"]:
        out.append((False, 3, orjson.dumps(m.get("role"))))
        for b in _blocks(m.get("content")):
            text = _text([b]) or _text(b.get("content")) or orjson.dumps(b.get("input")).decode()
            out.append(("cache_control" in b, len(text.split()), orjson.dumps(b)))
    return out


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def start_anthropic_stub(
    options: AnthropicStubOptions | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Serve an Anthropic stub; its ``url`` is the API base (``.../v1``)."""
    stub = _AnthropicStub(options or AnthropicStubOptions())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes([web.post("/v1/messages", stub.messages), web.get("/health", _health)])
    return await serve(app, "/v1", stub.stats, stub.options, host, port)


def main(argv: list[str] | None = None) -> None:
    """``python -m lmgate.testing.anthropic_stub [--host H] [--port P] [--api-key K]``."""
    parser = argparse.ArgumentParser(prog="python -m lmgate.testing.anthropic_stub")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--fail-status", type=int, default=None)
    args = parser.parse_args(argv)
    options = AnthropicStubOptions(api_key=args.api_key, fail_status=args.fail_status)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_forever(start_anthropic_stub(options, args.host, args.port)))


if __name__ == "__main__":
    main()
