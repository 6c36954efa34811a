"""Deterministic OpenAI-compatible stub upstream server.

Used by the gateway's tests, by the benchmark (as a paced SSE upstream), as the built-in
demo model and as the worker process that batch jobs start.

Replies are deterministic. The chat reply is ``REPLY_PREFIX`` followed by the text of the
last user message (string content, or the text parts of list content joined by spaces);
legacy completions answer each prompt the same way. Tokens are counted as
whitespace-separated words:

* chat ``prompt_tokens`` = words over all message text contents + 3 per message;
* completions ``prompt_tokens`` = words over all prompts;
* ``completion_tokens`` = words in the reply (after truncation);
* embeddings ``prompt_tokens`` = words of each string input, or the length of each
  token array.

``max_tokens`` / ``max_completion_tokens`` truncate the reply to that many words and set
``finish_reason`` to ``"length"``.

Streams send, with no pause, a role chunk (chat only) and the first content chunk; then
each further content chunk ``chunk_delay`` seconds after the previous one (on an absolute
schedule, so pacing does not drift); then the finish chunk(s), the usage chunk when asked
for, and ``data: [DONE]``. ``delay`` is waited before the response headers of every
``/v1`` request. While waiting the stub polls the connection every 20 ms, so a client that
goes away is noticed promptly and recorded in :class:`Stats`.

A request may override behaviour with a ``"stub"`` object in its JSON body (the openai
SDK sends it with ``extra_body``): ``status``, ``delay``, ``chunk_delay``, ``chunks``,
``drop_after``, ``content`` and ``usage``; see :class:`Controls`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import itertools
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

REPLY_PREFIX = "This is lmgate's stub worker answering: "
CREATED = 1_700_000_000
OWNER = "lmgate-stub"

_POLL_INTERVAL = 0.02
_SHUTDOWN_TIMEOUT = 0.1
_MAX_BODY = 64 * 1024 * 1024
_PIECE = re.compile(r"\s*\S+\s*")
_NUMBER = (int, float)
_NONE = type(None)

# Fields of the per-request "stub" object; null means "use the server's setting".
_CONTROL_TYPES: dict[str, tuple[type, ...]] = {
    "status": (int, _NONE),
    "delay": (*_NUMBER, _NONE),
    "chunk_delay": (*_NUMBER, _NONE),
    "chunks": (int, _NONE),
    "drop_after": (int, _NONE),
    "content": (str, _NONE),
    "usage": (bool, _NONE),
}
# Fields that POST /_stub/config may change in the running options.
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "delay": _NUMBER,
    "chunk_delay": _NUMBER,
    "fail_status": (int, _NONE),
    "chunks": (int, _NONE),
}


@dataclass
class StubOptions:
    """Server-wide behaviour of the stub.

    ``delay``, ``chunk_delay`` and ``chunks`` are the defaults of the per-request
    :class:`Controls`; ``fail_status`` answers every ``/v1`` request with that error
    (``/health`` and ``/_stub/*`` keep working); ``api_key`` is required as a bearer token
    on ``/v1``; with ``accept_any_model`` off, models not in ``models`` get a 404.
    """

    name: str = "stub"
    models: list[str] = field(default_factory=lambda: ["stub-model"])
    accept_any_model: bool = True
    chunk_delay: float = 0.0
    chunks: int | None = None
    delay: float = 0.0
    fail_status: int | None = None
    api_key: str | None = None
    embedding_dim: int = 8


@dataclass(frozen=True, slots=True)
class Controls:
    """Effective behaviour for one request: the options overridden by its ``"stub"`` field.

    ``status``: answer with this HTTP error status (429 adds ``retry-after: 1``).
    ``delay``: seconds before the response headers. ``chunk_delay``: seconds between
    content chunks. ``chunks``: content chunks per reply (default one per word).
    ``drop_after``: abort the connection after this many content chunks (non-streaming:
    after the headers). ``content``: the reply text. ``usage``: always send a usage chunk.
    """

    status: int | None = None
    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int | None = None
    drop_after: int | None = None
    content: str | None = None
    usage: bool = False


@dataclass
class Stats:
    """What the stub has seen; served at ``GET /_stub/stats``, cleared by ``/_stub/reset``.

    ``requests``, ``by_path`` and ``last_request`` count every ``/v1`` POST on arrival.
    ``disconnects`` / ``disconnect_times`` (``time.monotonic()``) record clients that went
    away during ``delay`` or mid-stream; a ``drop_after`` abort is not a disconnect.
    """

    requests: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    last_request: dict[str, Any] | None = None
    disconnects: int = 0
    disconnect_times: list[float] = field(default_factory=list)
    stream_started_times: list[float] = field(default_factory=list)
    completed_streams: int = 0
    max_inflight: int = 0
    """The most requests the stub was answering at once."""

    def reset(self) -> None:
        """Clear everything in place (holders of this object see the change)."""
        fresh = Stats()
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(fresh, item.name))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)


class _ApiError(Exception):
    """An error answered in OpenAI's error envelope."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> web.Response:
        """The error as an HTTP response."""
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        if self.status == 429:
            kind = "requests"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        response = _json({"error": error}, status=self.status)
        if self.status == 429:
            response.headers["retry-after"] = "1"
        return response


@dataclass(frozen=True, slots=True)
class _Call:
    """One admitted ``/v1`` request."""

    request: web.Request
    body: Any
    controls: Controls


@dataclass(frozen=True, slots=True)
class _Reply:
    """A reply text with its finish reason and token count."""

    text: str
    finish_reason: str
    tokens: int


_Result = dict[str, Any] | web.StreamResponse
_Endpoint = Callable[[_Call], Awaitable[_Result]]


class _Stub:
    """Request handlers sharing the live options, the stats and the id counter."""

    def __init__(self, options: StubOptions) -> None:
        self.options = options
        self.stats = Stats()
        self._ids = itertools.count(1)
        self.inflight = 0
        """``/v1`` requests being answered (reported by ``--telemetry``)."""

    def routes(self) -> list[web.RouteDef]:
        """All routes of the stub."""
        return [
            web.get("/health", _health),
            web.get("/_stub/stats", self._stats),
            web.post("/_stub/reset", self._reset),
            web.post("/_stub/config", self._config),
            web.get("/v1/models", self._endpoint(self._models)),
            web.get("/v1/models/{model:.+}", self._endpoint(self._model_info)),
            web.post("/v1/chat/completions", self._endpoint(self._chat)),
            web.post("/v1/completions", self._endpoint(self._completions)),
            web.post("/v1/embeddings", self._endpoint(self._embeddings)),
            web.post("/v1/{tail:.+}", self._endpoint(_echo)),
        ]

    async def tag(self, request: web.Request, response: web.StreamResponse) -> None:
        """Mark every response with the stub's name."""
        response.headers["x-stub-name"] = self.options.name

    # -- admission ------------------------------------------------------------------

    def _endpoint(self, endpoint: _Endpoint) -> Handler:
        """Wrap ``endpoint(call) -> dict | StreamResponse`` with the common /v1 behaviour."""

        async def handle(request: web.Request) -> web.StreamResponse:
            self.inflight += 1
            self.stats.max_inflight = max(self.stats.max_inflight, self.inflight)
            try:
                return await answer(request)
            finally:
                self.inflight -= 1

        async def answer(request: web.Request) -> web.StreamResponse:
            body = await _read_json(request)
            if request.method == "POST":
                self._record(request, body)
            try:
                self._authorize(request)
                controls = _controls(self.options, body)
                call = _Call(request, body, controls)
                if not await _wait_until(request, time.monotonic() + controls.delay):
                    self._disconnected()
                    return web.Response(status=499)  # never sent: the client is gone
                if controls.status is not None:
                    raise _ApiError(controls.status, f"stub error {controls.status}")
                result = await endpoint(call)
            except _ApiError as exc:
                return exc.response()
            if isinstance(result, web.StreamResponse):
                return result
            return await _send_json(call, result)

        return handle

    def _record(self, request: web.Request, body: Any) -> None:
        stats = self.stats
        stats.requests += 1
        stats.by_path[request.path] = stats.by_path.get(request.path, 0) + 1
        headers = {str(name): value for name, value in request.headers.items()}
        stats.last_request = {"path": request.path, "headers": headers, "body": body}

    def _authorize(self, request: web.Request) -> None:
        key = self.options.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            raise _ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _model(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ApiError(400, "You must provide a model parameter.", param="model")
        self._check_model(model)
        return model

    def _check_model(self, model: str) -> None:
        if not self.options.accept_any_model and model not in self.options.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            raise _ApiError(404, message, code="model_not_found")

    def _disconnected(self) -> None:
        self.stats.disconnects += 1
        self.stats.disconnect_times.append(time.monotonic())

    # -- /v1 endpoints ----------------------------------------------------------------

    async def _models(self, call: _Call) -> _Result:
        return {"object": "list", "data": [_model_card(m) for m in self.options.models]}

    async def _model_info(self, call: _Call) -> _Result:
        model = call.request.match_info["model"]
        self._check_model(model)
        return _model_card(model)

    async def _chat(self, call: _Call) -> _Result:
        body = _json_object(call.body)
        model = self._model(body)
        messages = _messages(body)
        prompt = _last_user_text(messages)
        reply = _reply(call.controls.content, prompt, _max_tokens(body))
        prompt_tokens = sum(_count(_message_text(m)) + 3 for m in messages)
        usage = _usage(prompt_tokens, reply.tokens)
        ident = f"chatcmpl-stub-{next(self._ids)}"
        if body.get("stream") is True:
            meta = _meta(ident, "chat.completion.chunk", model)
            return await self._stream(call, _chat_events(call, body, meta, reply, usage))
        message = {"role": "assistant", "content": reply.text, "refusal": None}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }
        return {**_meta(ident, "chat.completion", model), "choices": [choice], "usage": usage}

    async def _completions(self, call: _Call) -> _Result:
        body = _json_object(call.body)
        model = self._model(body)
        prompts = _prompts(body)
        limit = _max_tokens(body)
        replies = [_reply(call.controls.content, prompt, limit) for prompt in prompts]
        usage = _usage(sum(map(_count, prompts)), sum(r.tokens for r in replies))
        meta = _meta(f"cmpl-stub-{next(self._ids)}", "text_completion", model)
        if body.get("stream") is True:
            return await self._stream(call, _completion_events(call, body, meta, replies, usage))
        choices = [_text_choice(i, r.text, r.finish_reason) for i, r in enumerate(replies)]
        return {**meta, "choices": choices, "usage": usage}

    async def _embeddings(self, call: _Call) -> _Result:
        body = _json_object(call.body)
        model = self._model(body)
        inputs = _embedding_inputs(body.get("input"))
        dim = _int_field(body, "dimensions", minimum=1) or self.options.embedding_dim
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            message = "encoding_format must be 'float' or 'base64'."
            raise _ApiError(400, message, param="encoding_format")
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(item, dim, encoding)}
            for i, item in enumerate(inputs)
        ]
        tokens = sum(_count(i) if isinstance(i, str) else len(i) for i in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model, "usage": usage}

    # -- streaming --------------------------------------------------------------------

    async def _stream(self, call: _Call, events: _Events) -> web.StreamResponse:
        """Send ``events`` as SSE, paced, watching for the client going away."""
        request, controls = call.request, call.controls
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        start = time.monotonic()
        self.stats.stream_started_times.append(start)
        try:
            for payload in events.head:
                await _send_event(response, payload)
            for i, payload in enumerate(events.content):
                if controls.drop_after is not None and i >= controls.drop_after:
                    _abort(request)
                    return response
                if not await _wait_until(request, start + i * controls.chunk_delay):
                    self._disconnected()
                    return response
                await _send_event(response, payload)
            for payload in events.tail:
                await _send_event(response, payload)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is a subclass
            self._disconnected()
            return response
        self.stats.completed_streams += 1
        return response

    # -- control endpoints ------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(self.stats.to_dict())

    async def _reset(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return _json({"status": "ok"})

    async def _config(self, request: web.Request) -> web.Response:
        try:
            body = _json_object(await _read_json(request))
            changes = _typed_fields(body, _CONFIG_TYPES, "config")
            _check_status(changes.get("fail_status"), "fail_status")
        except _ApiError as exc:
            return exc.response()
        for name, value in changes.items():
            setattr(self.options, name, value)
        return _json({name: getattr(self.options, name) for name in _CONFIG_TYPES})


_STUB = web.AppKey("lmgate_stub", _Stub)


@dataclass(frozen=True, slots=True)
class _Events:
    """SSE payloads of one stream: unpaced head, paced content, unpaced tail."""

    head: list[dict[str, Any]]
    content: list[dict[str, Any]]
    tail: list[dict[str, Any]]


def _chat_events(
    call: _Call, body: dict[str, Any], meta: dict[str, Any], reply: _Reply, usage: dict[str, int]
) -> _Events:
    with_usage = _include_usage(body, call.controls)

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _chunk(meta, [choice], with_usage)

    head = [chunk({"role": "assistant", "content": ""})]
    content = [chunk({"content": piece}) for piece in _split(reply.text, call.controls.chunks)]
    tail = [chunk({}, reply.finish_reason)]
    if with_usage:
        tail.append({**meta, "choices": [], "usage": usage})
    return _Events(head, content, tail)


def _completion_events(
    call: _Call,
    body: dict[str, Any],
    meta: dict[str, Any],
    replies: list[_Reply],
    usage: dict[str, int],
) -> _Events:
    with_usage = _include_usage(body, call.controls)
    content = [
        _chunk(meta, [_text_choice(i, piece, None)], with_usage)
        for i, reply in enumerate(replies)
        for piece in _split(reply.text, call.controls.chunks)
    ]
    tail = [
        _chunk(meta, [_text_choice(i, "", reply.finish_reason)], with_usage)
        for i, reply in enumerate(replies)
    ]
    if with_usage:
        tail.append({**meta, "choices": [], "usage": usage})
    return _Events([], content, tail)


def _meta(ident: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": ident, "object": kind, "created": CREATED, "model": model}


def _chunk(meta: dict[str, Any], choices: list[Any], with_usage: bool) -> dict[str, Any]:
    chunk = {**meta, "choices": choices}
    if with_usage:
        chunk["usage"] = None
    return chunk


def _text_choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def _include_usage(body: dict[str, Any], controls: Controls) -> bool:
    options = body.get("stream_options")
    return controls.usage or (isinstance(options, dict) and options.get("include_usage") is True)


async def _send_event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


async def _send_json(call: _Call, payload: dict[str, Any]) -> web.StreamResponse:
    """Answer with ``payload``, or send only the headers and abort when ``drop_after`` is set."""
    body = orjson.dumps(payload)
    if call.controls.drop_after is None:
        return web.Response(body=body, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(body)
    await response.prepare(call.request)
    _abort(call.request)
    return response


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait_until(request: web.Request, deadline: float) -> bool:
    """Sleep until ``deadline`` (monotonic); False as soon as the client has gone away."""
    while not _gone(request):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        await asyncio.sleep(min(remaining, _POLL_INTERVAL))
    return False


# -- request parsing ------------------------------------------------------------------


async def _read_json(request: web.Request) -> Any:
    """The parsed JSON body; None if it is absent or not valid JSON."""
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _ApiError(400, "We could not parse the JSON body of your request as an object.")
    return body


def _typed_fields(raw: Any, types: Mapping[str, tuple[type, ...]], param: str) -> dict[str, Any]:
    """Validate ``raw`` as an object whose fields have the given types (numbers >= 0)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _ApiError(400, f"'{param}' must be an object.", param=param)
    for name, value in raw.items():
        allowed = types.get(name)
        valid = (
            allowed is not None
            and isinstance(value, allowed)
            and (bool in allowed or not isinstance(value, bool))
            and not (isinstance(value, _NUMBER) and value < 0)
        )
        if not valid:
            raise _ApiError(400, f"Invalid field '{name}' in '{param}'.", param=f"{param}.{name}")
    return raw


def _check_status(status: int | None, param: str) -> None:
    if status is not None and not 400 <= status <= 599:
        raise _ApiError(400, f"'{param}' must be an HTTP error status.", param=param)


def _controls(options: StubOptions, body: Any) -> Controls:
    raw = body.get("stub") if isinstance(body, dict) else None
    overrides = {
        k: v for k, v in _typed_fields(raw, _CONTROL_TYPES, "stub").items() if v is not None
    }
    _check_status(overrides.get("status"), "stub.status")
    base = Controls(
        status=options.fail_status,
        delay=options.delay,
        chunk_delay=options.chunk_delay,
        chunks=options.chunks,
    )
    return dataclasses.replace(base, **overrides)


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _ApiError(400, "'messages' must be a list of message objects.", param="messages")
    return messages


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return _message_text(users[-1]) if users else ""


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    raise _ApiError(400, "'prompt' must be a string or a list of strings.", param="prompt")


def _max_tokens(body: dict[str, Any]) -> int | None:
    limit = _int_field(body, "max_completion_tokens", minimum=0)
    return _int_field(body, "max_tokens", minimum=0) if limit is None else limit


def _int_field(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    """The integer field ``name`` (None if absent or null), checked against ``minimum``."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _ApiError(400, f"'{name}' must be an integer >= {minimum}.", param=name)
    return value


def _embedding_inputs(raw: Any) -> list[str | list[int]]:
    """The inputs of an embeddings request: strings and token arrays."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(i, str) for i in raw):
            return list(raw)
        if all(_is_tokens(i) for i in raw):
            return list(raw)
        if _is_tokens(raw):
            return [raw]
    message = "'input' must be a string, a list of strings or a list of token arrays."
    raise _ApiError(400, message, param="input")


def _is_tokens(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


# -- reply construction ---------------------------------------------------------------


def _count(text: str) -> int:
    return len(text.split())


def _reply(content: str | None, prompt: str, limit: int | None) -> _Reply:
    """The reply to ``prompt`` (or ``content``), truncated to ``limit`` words."""
    text = REPLY_PREFIX + prompt if content is None else content
    pieces = _PIECE.findall(text)
    if limit is not None and limit < len(pieces):
        return _Reply("".join(pieces[:limit]).rstrip(), "length", limit)
    return _Reply(text, "stop", len(pieces))


def _split(text: str, chunks: int | None) -> list[str]:
    """Split ``text`` into ``chunks`` pieces (default: one per word) that concatenate to it.

    Pieces break at word boundaries, or at characters when more chunks than words are
    asked for; there is at least one piece and at most one per character.
    """
    units: list[str] = _PIECE.findall(text) or [text]
    if chunks is not None and chunks > len(units):
        units = list(text) or [text]
    count = len(units) if chunks is None else max(1, min(chunks, len(units)))
    bounds = [i * len(units) // count for i in range(count + 1)]
    return ["".join(units[a:b]) for a, b in itertools.pairwise(bounds)]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _model_card(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": CREATED, "owned_by": OWNER}


def _embedding(item: str | list[int], dim: int, encoding: str) -> list[float] | str:
    """A unit vector derived from the SHA-256 of ``item``, as floats or base64 float32."""
    seed = item.encode() if isinstance(item, str) else orjson.dumps(item)
    digest = b"".join(
        hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        for block in range((dim * 4 + 31) // 32)
    )
    raw = [x / 2**31 - 1.0 for x in struct.unpack(f"<{dim}I", digest[: dim * 4])]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    packed = struct.pack(f"<{dim}f", *(x / norm for x in raw))
    if encoding == "base64":
        return base64.b64encode(packed).decode("ascii")
    return list(struct.unpack(f"<{dim}f", packed))


async def _health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _echo(call: _Call) -> _Result:
    request = call.request
    return {
        "object": "stub.echo",
        "path": request.path,
        "method": request.method,
        "body": call.body,
    }


def _json(payload: Any, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type="application/json")


# -- application and process ----------------------------------------------------------


def build_app(options: StubOptions) -> web.Application:
    """The stub as an aiohttp application (it keeps its own copy of ``options``)."""
    stub = _Stub(dataclasses.replace(options, models=list(options.models)))
    app = web.Application(client_max_size=_MAX_BODY)
    app[_STUB] = stub
    app.add_routes(stub.routes())
    app.on_response_prepare.append(stub.tag)
    return app


@dataclass
class RunningStub:
    """A stub serving in the current event loop."""

    runner: web.AppRunner
    host: str
    port: int
    options: StubOptions
    stats: Stats

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. ``http://127.0.0.1:8000/v1``."""
        return f"http://{_netloc(self.host, self.port)}/v1"

    async def close(self) -> None:
        """Stop serving; streams still running are cut after a short grace period."""
        await self.runner.cleanup()


async def start_stub(options: StubOptions, host: str = "127.0.0.1", port: int = 0) -> RunningStub:
    """Serve a stub on ``host:port`` in the running loop.

    Port 0 picks a free port; give an IP address then, as a name resolving to several
    addresses would get a different port on each.
    """
    app = build_app(options)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    stub = app[_STUB]
    return RunningStub(runner, host, bound, stub.options, stub.stats)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


@dataclass(frozen=True)
class Announce:
    """Where a worker started by lmgate's managed backends reports itself.

    ``register_url`` receives ``{"instance", "host", "port", "startup_seconds"}`` once the
    stub listens; ``telemetry_url`` receives ``{"instance", "running", "waiting",
    "tokens_per_s"}`` every ``telemetry_interval`` seconds. Both carry ``secret`` as a
    bearer token.
    """

    register_url: str | None = None
    telemetry_url: str | None = None
    telemetry_interval: float = 2.0
    secret: str = ""
    instance: str = ""


async def _serve(
    options: StubOptions,
    host: str,
    port: int,
    port_file: Path | None,
    startup_delay: float = 0.0,
    announce: Announce | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(TimeoutError):  # a slow model load, interrupted by a signal
        await asyncio.wait_for(stop.wait(), startup_delay)
    if stop.is_set():
        return
    stub = await start_stub(options, host, port)
    tasks: list[asyncio.Task[None]] = []
    try:
        netloc = _netloc(host, stub.port)
        if port_file is not None:
            _write_atomically(port_file, netloc)
        print(f"stub listening on http://{netloc}", flush=True)
        if announce is not None:
            tasks.append(asyncio.create_task(_announce(announce, host, stub)))
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await stub.close()


async def _announce(announce: Announce, host: str, stub: RunningStub) -> None:
    """Register with the gateway, then send telemetry until cancelled."""
    advertised = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    headers = {"Authorization": f"Bearer {announce.secret}"}
    async with aiohttp.ClientSession(headers=headers, trust_env=False) as session:
        if announce.register_url:
            body = {
                "instance": announce.instance,
                "host": advertised,
                "port": stub.port,
                "startup_seconds": time.time() - _process_start(),
            }
            for attempt in range(10):
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.post(announce.register_url, json=body) as resp:
                        print(f"registered with {announce.register_url}: {resp.status}", flush=True)
                        if resp.status < 500:
                            break
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        while announce.telemetry_url:
            app_stub = stub.runner.app[_STUB]
            body = {"instance": announce.instance, "running": app_stub.inflight, "waiting": 0}
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.post(announce.telemetry_url, json=body) as resp:
                    await resp.read()
            await asyncio.sleep(announce.telemetry_interval)


def _process_start() -> float:
    """Unix time this process started (Linux), else now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lmgate.testing.stub", description="Deterministic OpenAI-compatible stub."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--name", default="stub")
    parser.add_argument("--models", default="stub-model", help="comma-separated model ids")
    parser.add_argument("--strict-models", action="store_true", help="404 for other models")
    parser.add_argument("--chunk-delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--chunks", type=int, default=None, help="content chunks per reply")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--fail-status", type=int, default=None, metavar="STATUS")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--port-file", type=Path, default=None, help="receives HOST:PORT")
    parser.add_argument(
        "--startup-delay", type=float, default=0.0, metavar="SECONDS", help="wait before listening"
    )
    parser.add_argument("--register", default=None, metavar="URL", help="POST host:port here")
    parser.add_argument(
        "--register-secret", default=None, help="bearer token (default $LMGATE_REGISTER_SECRET)"
    )
    parser.add_argument(
        "--register-instance", default=None, help="instance id (default $LMGATE_INSTANCE_ID)"
    )
    parser.add_argument("--telemetry", default=None, metavar="URL", help="POST load figures here")
    parser.add_argument("--telemetry-interval", type=float, default=2.0, metavar="SECONDS")
    return parser.parse_args(argv)


def _run(main_coroutine: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: serve until SIGTERM or SIGINT."""
    args = _parse_args(argv)
    options = StubOptions(
        name=args.name,
        models=[m for m in args.models.split(",") if m],
        accept_any_model=not args.strict_models,
        chunk_delay=args.chunk_delay,
        chunks=args.chunks,
        delay=args.delay,
        fail_status=args.fail_status,
        api_key=args.api_key,
        embedding_dim=args.embedding_dim,
    )
    announce = None
    if args.register or args.telemetry:
        announce = Announce(
            register_url=args.register,
            telemetry_url=args.telemetry,
            telemetry_interval=args.telemetry_interval,
            secret=args.register_secret or os.environ.get("LMGATE_REGISTER_SECRET", ""),
            instance=args.register_instance or os.environ.get("LMGATE_INSTANCE_ID", ""),
        )
    with contextlib.suppress(KeyboardInterrupt):  # a SIGINT before the handlers are set
        _run(_serve(options, args.host, args.port, args.port_file, args.startup_delay, announce))


if __name__ == "__main__":
    main()
