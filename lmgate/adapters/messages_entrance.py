"""The Anthropic-compatible entrance: `POST /v1/messages` served by an OpenAI-compatible model.

`openai_request_from_messages` turns a Messages request into an OpenAI chat request (system
prompt, text and image blocks, `tool_use`/`tool_result`, tools and tool choice, stop
sequences; streams ask for the usage chunk). `messages_response_from_openai` and
`MessagesStreamFromOpenAI` turn the answer back into a Message or Anthropic's event stream;
`messages_error_from_openai` and `anthropic_error_body` give errors Anthropic's shape.
Thinking blocks, documents, server tools and `top_k` are not converted.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmgate.adapters.sse import SSEDecoder
from lmgate.api.errors import GatewayError

FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _invalid(message: str) -> GatewayError:
    return GatewayError(400, message, type="invalid_request_error", code="invalid_request")


# -- requests -------------------------------------------------------------------------------


def openai_request_from_messages(data: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as an OpenAI chat request; GatewayError (400) when impossible."""
    for key in ("model", "max_tokens", "messages"):
        if key not in data:
            raise _invalid(f"{key}: Field required")
    messages: list[dict[str, Any]] = []
    system = data.get("system")
    if system:
        messages.append({"role": "system", "content": _joined_text(system)})
    raw = data["messages"]
    if not isinstance(raw, list):
        raise _invalid("messages: Input should be a valid list")
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise _invalid("messages: each message needs the role user or assistant")
        if m["role"] == "user":
            messages.extend(_user_messages(m.get("content")))
        else:
            messages.append(_assistant_message(m.get("content")))
    body: dict[str, Any] = {"model": data["model"], "messages": messages}
    body["max_tokens"] = data["max_tokens"]
    for key in ("temperature", "top_p"):
        if data.get(key) is not None:
            body[key] = data[key]
    if data.get("stop_sequences"):
        body["stop"] = data["stop_sequences"]
    if data.get("stream") is True:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    user = (data.get("metadata") or {}).get("user_id")
    if isinstance(user, str):
        body["user"] = user
    _tools(data, body)
    return body


def _joined_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n\n".join(
            str(b.get("text", "")) for b in content if isinstance(b, dict) and b["type"] == "text"
        )
    raise _invalid("content must be a string or a list of blocks")


def _user_messages(content: object) -> list[dict[str, Any]]:
    """A user turn: its tool results as `tool` messages, then the rest as one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise _invalid("content must be a string or a list of blocks")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            text = _joined_text(block.get("content") or "")
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        elif kind == "text":
            parts.append({"type": "text", "text": block.get("text", "")})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block)}})
        else:
            raise _invalid(f"content blocks of type {kind!r} are not supported by this model")
    if parts and all(p["type"] == "text" for p in parts):
        out.append({"role": "user", "content": "\n\n".join(p["text"] for p in parts)})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _image_url(block: dict[str, Any]) -> str:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if source.get("type") == "url":
        return str(source.get("url"))
    raise _invalid("image sources must be base64 or url")


def _assistant_message(content: object) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise _invalid("content must be a string or a list of blocks")
    texts, calls = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            fn = {"name": block.get("name"), "arguments": orjson.dumps(block.get("input")).decode()}
            calls.append({"id": block.get("id"), "type": "function", "function": fn})
        elif kind not in ("thinking", "redacted_thinking"):
            raise _invalid(f"content blocks of type {kind!r} are not supported by this model")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(data: dict[str, Any], body: dict[str, Any]) -> None:
    tools = data.get("tools")
    if tools:
        converted = []
        for tool in tools:
            if not isinstance(tool, dict) or "input_schema" not in tool:
                raise _invalid("only client tools (with an input_schema) are supported")
            fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
            if tool.get("description"):
                fn["description"] = tool["description"]
            converted.append({"type": "function", "function": fn})
        body["tools"] = converted
    choice = data.get("tool_choice")
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "tool":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "any", "none"):
        body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True and tools:
        body["parallel_tool_calls"] = False


# -- answers ----------------------------------------------------------------------------------


def _anthropic_usage(usage: object) -> dict[str, int]:
    """OpenAI usage as Anthropic's: cached prompt tokens are cache reads, not input."""
    u = usage if isinstance(usage, dict) else {}
    details = u.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens") if isinstance(details, dict) else None)
    prompt, output = _int(u.get("prompt_tokens")), _int(u.get("completion_tokens"))
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _stop(choice: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's stop reason and stop sequence for an OpenAI choice (vLLM names the stop)."""
    reason = FINISH_TO_STOP.get(str(choice.get("finish_reason")), "end_turn")
    matched = choice.get("stop_reason")
    if reason == "end_turn" and isinstance(matched, str):
        return "stop_sequence", matched
    return reason, None


def messages_response_from_openai(body: bytes, model: str) -> bytes:
    """An OpenAI `chat.completion` as an Anthropic Message for `model`."""
    obj = orjson.loads(body)
    choice = (obj.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {"arguments": fn.get("arguments")}
        content.append(
            {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments}
        )
    reason, sequence = _stop(choice)
    out = {
        "id": f"msg_{obj.get('id', '')}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": _anthropic_usage(obj.get("usage")),
    }
    return orjson.dumps(out)


def anthropic_error_body(status: int, message: str, type: str | None = None) -> bytes:
    """Anthropic's error envelope, e.g. for the gateway's own errors on `/v1/messages`."""
    kind = type or _ERROR_TYPES.get(
        status, "api_error" if status >= 500 else "invalid_request_error"
    )
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def messages_error_from_openai(status: int, body: bytes) -> tuple[int, bytes]:
    """An OpenAI error answer as Anthropic's (the status is kept)."""
    message = f"Upstream answered {status}."
    try:
        error = orjson.loads(body).get("error")
        message = str(error.get("message") or message) if isinstance(error, dict) else str(error)
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return status, anthropic_error_body(status, message)


def event(name: str, payload: dict[str, Any]) -> bytes:
    """One event of Anthropic's stream format."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesStreamFromOpenAI:
    """Converts an OpenAI chat stream (SSE) into Anthropic's Messages event stream."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.complete = False
        self.error: dict[str, Any] | None = None
        self._decoder = SSEDecoder()
        self._out: list[bytes] = []
        self._started = False
        self._block = -1
        self._block_kind = ""
        self._tool_blocks: dict[int, int] = {}
        self._stop: tuple[str, str | None] = ("end_turn", None)
        self._usage: object = None

    def feed(self, chunk: bytes) -> bytes:
        """Anthropic events for the OpenAI events completed by `chunk`."""
        for _, data in self._decoder.feed(chunk):
            self._handle(data)
        return self._take()

    def finish(self) -> bytes:
        """The rest; nothing more if the OpenAI stream broke (no `[DONE]`) or failed."""
        for _, data in self._decoder.flush():
            self._handle(data)
        return self._take()

    def _take(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _handle(self, data: str) -> None:
        if self.complete or self.error is not None:
            return
        if data.strip() == "[DONE]":
            self._close()
            return
        obj = orjson.loads(data)
        if isinstance(obj.get("error"), dict):
            self.error = orjson.loads(anthropic_error_body(500, str(obj["error"].get("message"))))
            self._out.append(event("error", self.error))
            return
        self._start(str(obj.get("id", "")))
        if obj.get("usage"):
            self._usage = obj["usage"]
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                self._tool_call(call)
            if choice.get("finish_reason"):
                self._stop = _stop(choice)

    def _start(self, ident: str) -> None:
        if self._started:
            return
        self._started = True
        message: dict[str, Any] = {
            "id": f"msg_{ident}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        self._out.append(event("message_start", {"type": "message_start", "message": message}))
        self._out.append(event("ping", {"type": "ping"}))

    def _open(self, kind: str, block: dict[str, Any]) -> None:
        self._stop_block()
        self._block += 1
        self._block_kind = kind
        payload = {"type": "content_block_start", "index": self._block, "content_block": block}
        self._out.append(event("content_block_start", payload))

    def _stop_block(self) -> None:
        if self._block_kind:
            payload = {"type": "content_block_stop", "index": self._block}
            self._out.append(event("content_block_stop", payload))
            self._block_kind = ""

    def _delta(self, index: int, delta: dict[str, Any]) -> None:
        payload = {"type": "content_block_delta", "index": index, "delta": delta}
        self._out.append(event("content_block_delta", payload))

    def _text(self, text: str) -> None:
        if self._block_kind != "text":
            self._open("text", {"type": "text", "text": ""})
        self._delta(self._block, {"type": "text_delta", "text": text})

    def _tool_call(self, call: dict[str, Any]) -> None:
        index = call.get("index", 0)
        fn = call.get("function") or {}
        if index not in self._tool_blocks:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id"),
                "name": fn.get("name"),
                "input": {},
            }
            self._open("tool_use", block)
            self._tool_blocks[index] = self._block
        if fn.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": fn["arguments"]}
            self._delta(self._tool_blocks[index], delta)

    def _close(self) -> None:
        self._start("")
        self._stop_block()
        reason, sequence = self._stop
        usage = _anthropic_usage(self._usage)
        payload = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage,
        }
        self._out.append(event("message_delta", payload))
        self._out.append(event("message_stop", {"type": "message_stop"}))
        self.complete = True
