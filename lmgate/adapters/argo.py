"""ARGO, Argonne's internal LLM gateway, converted to and from OpenAI's API.

ARGO's endpoints, under a base URL such as `https://apps.inside.anl.gov/argoapi/api/v1`:

* `POST /resource/chat/` takes `{"user", "model", "messages", "temperature", "top_p",
  "max_tokens", "stop"}` and answers `{"response": "<text>"}`;
* `POST /resource/streamchat/` takes the same and streams the reply as plain text (not SSE);
* `POST /resource/embed/` takes `{"user", "model", "prompt": [strings]}` and answers
  `{"embedding": [[floats], ...]}`;
* `GET /resource/health/` tells whether ARGO is up.

ARGO reports no token counts: chat answers carry no `usage`, so the gateway counts them with
its offline tokenizer and marks them estimated. Embeddings must carry a `usage` in OpenAI's
format; it is counted here with the same tokenizer (cl100k, the BPE of OpenAI's embedding
models). Function calling goes through the prompt convention of `toolprompt`.
"""

from __future__ import annotations

import base64
import codecs
import fnmatch
import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmgate.accounting.tokenizer import count_tokens
from lmgate.adapters import toolprompt
from lmgate.adapters.base import (
    Context,
    UpstreamCall,
    chat_completion,
    embedding_inputs,
    openai_error,
    text_completion,
    text_of,
    unsupported,
)
from lmgate.adapters.sse import DONE, ChunkWriter
from lmgate.api.errors import GatewayError

ARGO_MODELS: dict[str, str] = {
    "argo:gpt-3.5-turbo": "gpt35",
    "argo:gpt-3.5-turbo-16k": "gpt35large",
    "argo:gpt-4": "gpt4",
    "argo:gpt-4-32k": "gpt4large",
    "argo:gpt-4-turbo-preview": "gpt4turbo",
    "argo:gpt-4-turbo": "gpt4turbo",
    "argo:gpt-4o": "gpt4o",
    "argo:gpt-4o-latest": "gpt4olatest",
    "argo:gpt-o1-preview": "gpto1preview",
    "argo:gpt-o1-mini": "gpto1mini",
    "argo:gpt-o1": "gpto1",
    "argo:gpt-o3-mini": "gpto3mini",
    "argo:gpt-o3": "gpto3",
    "argo:gpt-o4-mini": "gpto4mini",
    "argo:gpt-4.1": "gpt41",
    "argo:gpt-4.1-mini": "gpt41mini",
    "argo:gpt-4.1-nano": "gpt41nano",
    "argo:gemini-2.5-pro": "gemini25pro",
    "argo:gemini-2.5-flash": "gemini25flash",
    "argo:claude-opus-4": "claudeopus4",
    "argo:claude-sonnet-4": "claudesonnet4",
    "argo:claude-sonnet-3.7": "claudesonnet37",
    "argo:claude-sonnet-3.5-v2": "claudesonnet35v2",
    "argo:text-embedding-ada-002": "ada002",
    "argo:text-embedding-3-small": "v3small",
    "argo:text-embedding-3-large": "v3large",
}
"""OpenAI-style names (argo-proxy's) of ARGO's models, and ARGO's own names for them."""

NO_SYSTEM_MODELS = ("gpto1preview", "gpto1mini")
"""ARGO models (fnmatch patterns) that refuse a system message."""

CHAT, STREAM, EMBED, HEALTH = (
    "/resource/chat/",
    "/resource/streamchat/",
    "/resource/embed/",
    ("/resource/health/"),
)
NATIVE = {"/chat": CHAT, "/streamchat": STREAM, "/embed": EMBED}
"""The gateway's native ARGO paths (after `/v1`) and their upstream suffixes."""

_SAMPLING = ("temperature", "top_p", "stop")


@dataclass(frozen=True, slots=True)
class ArgoOptions:
    """A provider's ARGO settings.

    `user` is the ARGO user name sent with every request; with `user_per_key`, the lmgate
    user making the request is sent instead (`user` then only for requests without one).
    `models` adds to or overrides the shipped name table; `no_system_models` lists the ARGO
    models (fnmatch patterns) whose system prompt is folded into the first user turn.
    """

    user: str | None = None
    user_per_key: bool = False
    models: dict[str, str] = field(default_factory=dict)
    no_system_models: tuple[str, ...] = NO_SYSTEM_MODELS


class ArgoAdapter:
    """OpenAI chat, legacy completions and embeddings on ARGO."""

    passthrough = False

    def __init__(self, options: ArgoOptions | None = None) -> None:
        self.options = options or ArgoOptions()
        self.models = {**ARGO_MODELS, **self.options.models}

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """ARGO authenticates by network and user name; a key, if given, goes as a bearer."""
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def argo_model(self, name: str) -> str:
        """ARGO's name for a model (names not in the table are taken as ARGO's own)."""
        return self.models.get(name, name)

    def build(
        self, kind: str, data: dict[str, Any], upstream_model: str, user: str | None
    ) -> UpstreamCall:
        """The ARGO request for an OpenAI request."""
        model = self.argo_model(upstream_model)
        body: dict[str, Any] = {"user": self._user(user), "model": model}
        stream = data.get("stream") is True
        if kind == "embeddings":
            if data.get("dimensions") is not None:
                raise unsupported("ARGO embeddings have a fixed size.", "dimensions")
            body["prompt"] = embedding_inputs(data)
            return _post(EMBED, body, False)
        _refuse_unsupported(data)
        if kind == "completions":
            messages = [{"role": "user", "content": _one_prompt(data)}]
        else:
            messages = _messages(data)
            messages = self._fold_system(model, messages)
        body["messages"] = messages
        body.update({k: data[k] for k in _SAMPLING if data.get(k) is not None})
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return _post(STREAM if stream else CHAT, body, stream)

    def _user(self, user: str | None) -> str:
        name = user if (self.options.user_per_key and user) else self.options.user
        if not name:
            raise GatewayError(
                500, "The ARGO provider has no `argo_user` configured.", code="provider_config"
            )
        return name

    def _fold_system(self, model: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """For models without a system role: the system text opens the first user turn."""
        if not any(fnmatch.fnmatch(model, p) for p in self.options.no_system_models):
            return messages
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rest = [m for m in messages if m["role"] != "system"]
        if not system:
            return rest
        for i, m in enumerate(rest):
            if m["role"] == "user":
                rest[i] = {"role": "user", "content": f"{system}\n\n{m['content']}"}
                return rest
        return [{"role": "user", "content": system}, *rest]

    def response(self, kind: str, status: int, body: bytes, ctx: Context) -> tuple[int, bytes]:
        """ARGO's complete answer as OpenAI's."""
        if status >= 400:
            return argo_error(status, body)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if kind == "embeddings":
            return _embeddings(answer, ctx)
        text = answer.get("response") if isinstance(answer, dict) else None
        if not isinstance(text, str):
            return openai_error(502, "ARGO answered without a `response`.", code="bad_upstream")
        if kind == "completions":
            return 200, orjson.dumps(text_completion(ctx, text, "stop"))
        if ctx.tool_names:
            parsed = toolprompt.parse(text, ctx.tool_names)
            if parsed.tool_calls:
                obj = chat_completion(ctx, parsed.content, "tool_calls", parsed.tool_calls)
                return 200, orjson.dumps(obj)
        return 200, orjson.dumps(chat_completion(ctx, text, "stop"))

    def stream(self, kind: str, ctx: Context) -> ArgoStream:
        """A converter of ARGO's plain-text stream."""
        return ArgoStream(ctx)


class ArgoStream:
    """ARGO's plain-text stream as OpenAI chunks; tool calls are held back and sent whole."""

    def __init__(self, ctx: Context) -> None:
        self.complete = True  # plain text has no end marker: the end of the body is the end
        self.error: dict[str, Any] | None = None
        self._writer = ChunkWriter(ctx)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        names = ctx.tool_names if ctx.kind == "chat" else ()
        self._splitter = toolprompt.StreamSplitter(names) if names else None

    def feed(self, chunk: bytes) -> bytes:
        """Text chunks as content deltas."""
        self._text(self._decoder.decode(chunk))
        return self._writer.take()

    def _text(self, text: str) -> None:
        if self._splitter is not None:
            text = self._splitter.feed(text)
        self._writer.text(text)

    def finish(self) -> bytes:
        """Held text or tool calls, the finish chunk and `[DONE]`."""
        writer = self._writer
        self._text(self._decoder.decode(b"", final=True))
        reason = "stop"
        if self._splitter is not None:
            parsed = self._splitter.finish()
            writer.text(parsed.content or "")
            for i, call in enumerate(parsed.tool_calls):
                writer.tool_call(i, call["function"], call["id"])
                reason = "tool_calls"
        writer.end(reason, None)
        return writer.take() + DONE


def argo_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An ARGO error (FastAPI's `{"detail": ...}`, JSON or plain text) as OpenAI's."""
    message = body[:500].decode("utf-8", "replace").strip()
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    if isinstance(obj, dict):
        detail = obj.get("detail", obj.get("error", obj.get("message")))
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return openai_error(status, f"ARGO: {message or f'status {status}'}")


def status_call() -> UpstreamCall:
    """The request behind the gateway's `/v1/status` for an ARGO provider."""
    return UpstreamCall("GET", HEALTH, b"", {}, False)


def status_answer(status: int | None) -> tuple[int, bytes]:
    """`/v1/status`: whether ARGO answered its health check (None: it could not be reached)."""
    alive = status is not None and status < 400
    body = {"status": "alive" if alive else "down", "upstream_status": status}
    return (200 if alive else 503), orjson.dumps(body)


def _post(suffix: str, body: dict[str, Any], stream: bool) -> UpstreamCall:
    headers = {"Content-Type": "application/json"}
    if stream:
        headers["Accept"] = "text/plain"
    return UpstreamCall("POST", suffix, orjson.dumps(body), headers, stream)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    n = data.get("n")
    if isinstance(n, int) and n > 1:
        raise unsupported("ARGO answers one choice per request.", "n")
    if data.get("logprobs"):
        raise unsupported("ARGO gives no log probabilities.", "logprobs")
    for tool in data.get("tools") or []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise unsupported("ARGO models take function tools only.", "tools")


def _one_prompt(data: dict[str, Any]) -> str:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise unsupported("ARGO completes one text prompt per request.", "prompt")
    return prompt


def _messages(data: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI messages as ARGO's text-only ones, tool calls and results in the convention."""
    out: list[dict[str, str]] = []
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise unsupported("`messages` must be a non-empty list.", "messages")
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(m, dict) or role not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise unsupported(f"Unsupported message at messages[{i}].", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") != "text" for p in content
        ):
            raise unsupported("ARGO models take text content only.", f"messages[{i}].content")
        if role == "tool":
            out.append({"role": "user", "content": toolprompt.render_result(m)})
            continue
        text = text_of(content)
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(toolprompt.render_call(c) for c in m["tool_calls"])
            text = f"{text}\n{calls}" if text else calls
        out.append({"role": "system" if role == "developer" else role, "content": text})
    tools = data.get("tools")
    if tools and data.get("tool_choice") != "none":
        note = toolprompt.instructions(tools, data.get("tool_choice"))
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{note}"}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _embeddings(answer: object, ctx: Context) -> tuple[int, bytes]:
    vectors = answer.get("embedding") if isinstance(answer, dict) else None
    if not isinstance(vectors, list):
        return openai_error(502, "ARGO answered without an `embedding`.", code="bad_upstream")
    data = []
    for i, vector in enumerate(vectors):
        value: object = vector
        if ctx.base64:
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(count_tokens(text, "text-embedding-3-small") for text in ctx.inputs)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": data, "model": ctx.model, "usage": usage}
    return 200, orjson.dumps(body)
