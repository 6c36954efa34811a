"""The adapter interface: an upstream API that is not OpenAI's, converted to and from it.

An adapter turns an OpenAI request (`chat`, `completions` or `embeddings`) into the provider's
(`build`), and the provider's answer back into OpenAI's: a complete body or error (`response`)
or a stream (`stream`, a `StreamConverter` fed the upstream's bytes as they arrive). The
OpenAI-compatible pass-through is the `OpenAIAdapter`, whose `passthrough` flag tells the
gateway to keep its own hot path: it never calls the conversion methods.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from lmgate.api.errors import GatewayError

KINDS = ("chat", "completions", "embeddings")

# OpenAI's error `type` for each status an adapter reports.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True, slots=True)
class UpstreamCall:
    """What to send upstream for one request.

    `suffix` is relative to the provider's base URL; `stream` tells the relay to read the
    answer as a stream (through `Adapter.stream`) whatever its content type: ARGO streams
    plain text, not SSE.
    """

    method: str
    suffix: str
    body: bytes
    headers: dict[str, str]
    stream: bool


@dataclass(slots=True)
class Context:
    """What converting one request's answer needs to know about the request."""

    kind: str
    model: str
    """The model name reported to the client (the name it asked for)."""
    id: str
    created: int
    stream: bool = False
    include_usage: bool = False
    tool_names: tuple[str, ...] = ()
    """Function tools the model may call (empty when none, or when `tool_choice` is none)."""
    inputs: tuple[str, ...] = ()
    """The text inputs of an embeddings request (counted for its usage)."""
    base64: bool = False
    """Embeddings asked for as base64 (the openai SDK's default)."""

    @classmethod
    def for_request(
        cls,
        kind: str,
        data: dict[str, Any],
        model: str,
        request_id: str | None = None,
        created: int | None = None,
    ) -> Context:
        """The context of an OpenAI request `data` for the public model name `model`."""
        prefix = {"chat": "chatcmpl-", "completions": "cmpl-"}.get(kind, "emb-")
        options = data.get("stream_options")
        return cls(
            kind=kind,
            model=model,
            id=prefix + (request_id or uuid.uuid4().hex),
            created=int(time.time()) if created is None else created,
            stream=data.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            tool_names=() if data.get("tool_choice") == "none" else tool_names(data),
            inputs=tuple(embedding_inputs(data)) if kind == "embeddings" else (),
            base64=data.get("encoding_format") == "base64",
        )


class StreamConverter(Protocol):
    """Upstream stream bytes in, OpenAI SSE bytes out; chunk boundaries may fall anywhere."""

    complete: bool
    """True once the upstream's stream ended properly (or when it has no end marker)."""
    error: dict[str, Any] | None
    """The upstream's mid-stream error as OpenAI's envelope, already sent as an SSE event."""

    def feed(self, chunk: bytes) -> bytes:
        """Convert the next upstream bytes; returns the OpenAI SSE bytes to send (maybe b"")."""
        ...

    def finish(self) -> bytes:
        """At the upstream's end: the final chunks, the usage chunk if asked, `[DONE]`."""
        ...


class Adapter(Protocol):
    """Converts one provider type's API to OpenAI's."""

    passthrough: bool
    """True for OpenAI-compatible upstreams: forward as is, never call the methods below."""

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """The credential headers for the provider's connection pool."""
        ...

    def build(
        self, kind: str, data: dict[str, Any], upstream_model: str, user: str | None
    ) -> UpstreamCall:
        """The upstream request for an OpenAI request; raises GatewayError (400) if impossible."""
        ...

    def response(self, kind: str, status: int, body: bytes, ctx: Context) -> tuple[int, bytes]:
        """A complete upstream answer (success or error) as OpenAI's status and JSON body."""
        ...

    def stream(self, kind: str, ctx: Context) -> StreamConverter:
        """A converter for the upstream's streamed answer to this request."""
        ...


class OpenAIAdapter:
    """The OpenAI-compatible pass-through.

    The gateway relays these requests and answers untouched on its own hot path; the methods
    below do the same for callers that treat every adapter alike (the identity conversion).
    """

    passthrough = True
    _SUFFIXES = {"chat": "/chat/completions", "completions": "/completions"}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """`Authorization: Bearer <key>` (nothing without a key)."""
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def build(
        self, kind: str, data: dict[str, Any], upstream_model: str, user: str | None
    ) -> UpstreamCall:
        """The request itself, for the upstream's model name."""
        body = orjson.dumps({**data, "model": upstream_model})
        suffix = self._SUFFIXES.get(kind, "/embeddings")
        headers = {"Content-Type": "application/json"}
        return UpstreamCall("POST", suffix, body, headers, data.get("stream") is True)

    def response(self, kind: str, status: int, body: bytes, ctx: Context) -> tuple[int, bytes]:
        """The answer itself."""
        return status, body

    def stream(self, kind: str, ctx: Context) -> StreamConverter:
        """The stream itself."""
        return _Identity()


class _Identity:
    """A stream passed on unchanged."""

    def __init__(self) -> None:
        self.complete = True
        self.error: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        return b""


# -- helpers shared by the adapters ------------------------------------------------------------


def unsupported(message: str, param: str | None = None) -> GatewayError:
    """A 400 for a request the provider cannot serve."""
    return GatewayError(400, message, param=param, code="unsupported_parameter")


def openai_error(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
) -> tuple[int, bytes]:
    """OpenAI's error envelope as (status, body)."""
    error = {
        "message": message,
        "type": type or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error"),
        "param": param,
        "code": code,
    }
    return status, orjson.dumps({"error": error})


def tool_names(data: dict[str, Any]) -> tuple[str, ...]:
    """The names of the function tools of an OpenAI request."""
    tools = data.get("tools")
    if not isinstance(tools, list):
        return ()
    names = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return tuple(names)


def embedding_inputs(data: dict[str, Any]) -> list[str]:
    """The text inputs of an embeddings request; 400 for token arrays."""
    value = data.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise unsupported("This provider takes `input` as a string or a list of strings.", "input")
    return items


def text_of(content: object) -> str:
    """The text of OpenAI message content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def usage_object(prompt: int, completion: int, cached: int | None = None) -> dict[str, Any]:
    """OpenAI's `usage` object."""
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def chat_completion(
    ctx: Context,
    content: str | None,
    finish_reason: str,
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    out = {
        "id": ctx.id,
        "object": "chat.completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [choice],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def text_completion(
    ctx: Context, text: str, finish_reason: str | None, usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A `text_completion` object (legacy completions, whole or as a stream chunk)."""
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
    out = {
        "id": ctx.id,
        "object": "text_completion",
        "created": ctx.created,
        "model": ctx.model,
        "choices": [choice],
    }
    if usage is not None:
        out["usage"] = usage
    return out
