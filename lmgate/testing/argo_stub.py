"""Deterministic stub of ARGO, Argonne's LLM gateway, for tests and demos.

Serves, under ``/argoapi/api/v1``: ``POST /resource/chat/`` (answers ``{"response": text}``),
``POST /resource/streamchat/`` (the same text streamed as plain-text chunks),
``POST /resource/embed/`` (``{"embedding": [[floats], ...]}``) and
``GET /resource/health/``. Like ARGO it reports no token counts. Requests need ``user`` and
``model``, and ``messages`` or ``prompt``; errors are FastAPI's ``{"detail": ...}``.

The reply is ``REPLY_PREFIX`` followed by the last user text. That text may steer the stub:

* ``use the tool NAME`` (optionally ``with {json arguments}``): the reply is a call in the
  ``<tool_call>`` prompt convention of ``lmgate.adapters.toolprompt``;
* ``[stub status=503]``, ``[stub content=...]``, ``[stub chunks=2]``: an error status, a fixed
  reply, the number of stream chunks.

``max_tokens`` truncates the reply to that many words; ``stop`` cuts it at a stop sequence.
The ``directives``/``tool_request`` helpers and ``RunningServer`` are shared with the
Anthropic stub.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import re
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

REPLY_PREFIX = "This is lmgate's ARGO stub answering: "
PREFIX = "/argoapi/api/v1"
_DIRECTIVE = re.compile(r"\[stub (\w+)=([^\]]*)\]")
_TOOL = re.compile(r"use the tool (\w+)(?: with (\{.*\}))?", re.S)
_PIECE = re.compile(r"\s*\S+\s*")


@dataclass
class ArgoStubOptions:
    """Server-wide behaviour: ``fail_status`` answers every request with that error."""

    name: str = "argo-stub"
    fail_status: int | None = None
    chunk_delay: float = 0.0
    embedding_dim: int = 8


@dataclass
class StubStats:
    """What a stub has seen: request counts per path and the last request."""

    requests: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    last_request: dict[str, Any] | None = None

    def record(self, request: web.Request, body: object) -> None:
        """Count a request and keep it as the last one."""
        self.requests += 1
        self.by_path[request.path] = self.by_path.get(request.path, 0) + 1
        headers = dict(request.headers.items())
        self.last_request = {"path": request.path, "headers": headers, "body": body}

    def reset(self) -> None:
        """Forget everything."""
        self.requests, self.by_path, self.last_request = 0, {}, None


def directives(text: str) -> dict[str, str]:
    """The ``[stub key=value]`` directives in a message text."""
    return dict(_DIRECTIVE.findall(text))


def tool_request(text: str) -> tuple[str, dict[str, Any]] | None:
    """The tool name and arguments of a ``use the tool NAME [with {...}]`` instruction."""
    match = _TOOL.search(text)
    if match is None:
        return None
    try:
        arguments = orjson.loads(match[2]) if match[2] else {}
    except orjson.JSONDecodeError:
        arguments = {}
    return match[1], arguments if isinstance(arguments, dict) else {}


def pieces(text: str, chunks: int | None) -> list[str]:
    """``text`` split into word pieces, or into ``chunks`` roughly equal runs of them."""
    words = _PIECE.findall(text) or [text]
    if not chunks or chunks >= len(words):
        return words
    size = -(-len(words) // chunks)
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def truncate(text: str, max_tokens: object, stop: object) -> tuple[str, str]:
    """The reply cut at a stop sequence or after ``max_tokens`` words, and why it ended."""
    for seq in [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []:
        if isinstance(seq, str) and seq and seq in text:
            return text[: text.index(seq)], f"stop:{seq}"
    words = _PIECE.findall(text)
    if isinstance(max_tokens, int) and len(words) > max_tokens:
        return "".join(words[:max_tokens]).rstrip(), "length"
    return text, "end"


class _ArgoStub:
    def __init__(self, options: ArgoStubOptions) -> None:
        self.options = options
        self.stats = StubStats()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(f"{PREFIX}/resource/chat/", self._guard(self._chat)),
            web.post(f"{PREFIX}/resource/streamchat/", self._guard(self._stream)),
            web.post(f"{PREFIX}/resource/embed/", self._guard(self._embed)),
            web.get(f"{PREFIX}/resource/health/", _health),
            web.get("/_stub/stats", self._stats),
            web.post("/_stub/reset", self._reset),
        ]

    def _guard(
        self, handler: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return _detail(422, "The body is not valid JSON.")
            self.stats.record(request, body)
            if not isinstance(body, dict):
                return _detail(422, "The body must be an object.")
            for key in ("user", "model"):
                if not isinstance(body.get(key), str) or not body[key]:
                    return _detail(400, f"Missing required field: {key}")
            status = self.options.fail_status or _int(directives(_last_text(body)).get("status"))
            if status:
                return _detail(status, f"stub error {status}")
            return await handler(request, body)

        return handle

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        return web.json_response({"response": _reply(body)})

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        chunks = _int(directives(_last_text(body)).get("chunks"))
        for i, piece in enumerate(pieces(_reply(body), chunks)):
            if i and self.options.chunk_delay:
                await asyncio.sleep(self.options.chunk_delay)
            await response.write(piece.encode())
        await response.write_eof()
        return response

    async def _embed(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompts = body.get("prompt")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return _detail(422, "prompt must be a list of strings")
        dim = self.options.embedding_dim
        return web.json_response({"embedding": [_vector(p, dim) for p in prompts]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self.stats))

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response({"status": "ok"})


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _detail(status: int, message: str) -> web.Response:
    return web.json_response({"detail": message}, status=status)


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _last_text(body: dict[str, Any]) -> str:
    """The last user message's text (or the last prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                return str(m.get("content", ""))
    prompt = body.get("prompt")
    return str(prompt[-1]) if isinstance(prompt, list) and prompt else ""


def _reply(body: dict[str, Any]) -> str:
    text = _last_text(body)
    wanted = tool_request(text)
    if wanted is not None:
        call = orjson.dumps({"name": wanted[0], "arguments": wanted[1]}).decode()
        return f"I will call {wanted[0]}.\n<tool_call>\n{call}\n</tool_call>"
    reply = directives(text).get("content", REPLY_PREFIX + _DIRECTIVE.sub("", text).strip())
    return truncate(reply, body.get("max_tokens"), body.get("stop"))[0]


def _vector(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest() * (dim // 8 + 1)
    raw = struct.unpack(f"<{dim}I", digest[: dim * 4])
    return [round(x / 2**32, 6) for x in raw]


@dataclass
class RunningServer:
    """A stub serving in the current event loop."""

    runner: web.AppRunner
    base: str
    url: str
    """The base URL a provider configuration points at."""
    stats: StubStats
    options: Any

    async def close(self) -> None:
        """Stop serving."""
        await self.runner.cleanup()


async def serve(
    app: web.Application, path: str, stats: StubStats, options: Any, host: str, port: int
) -> RunningServer:
    """Serve ``app`` on ``host:port`` (0: a free port); ``url`` is the base URL + ``path``."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    base = f"http://{host}:{bound}"
    return RunningServer(runner, base, base + path, stats, options)


async def start_argo_stub(
    options: ArgoStubOptions | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningServer:
    """Serve an ARGO stub; its ``url`` is ARGO's API base (``.../argoapi/api/v1``)."""
    stub = _ArgoStub(options or ArgoStubOptions())
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.add_routes(stub.routes())
    return await serve(app, PREFIX, stub.stats, stub.options, host, port)


async def run_forever(start: Awaitable[RunningServer]) -> None:
    """Serve until interrupted, printing the base URL."""
    server = await start
    print(f"listening on {server.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m lmgate.testing.argo_stub [--host H] [--port P] [--fail-status S]``."""
    parser = argparse.ArgumentParser(prog="python -m lmgate.testing.argo_stub")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=None)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    options = ArgoStubOptions(fail_status=args.fail_status, chunk_delay=args.chunk_delay)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_forever(start_argo_stub(options, args.host, args.port)))


if __name__ == "__main__":
    main()
