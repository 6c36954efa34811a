"""Anthropic's Messages API as an upstream, converted to and from OpenAI's chat API.

Requests: system and developer messages become `system`; text and image parts become content
blocks (data URLs as base64 sources, http(s) URLs as url sources); assistant `tool_calls`
become `tool_use` blocks and `tool` messages `tool_result` blocks of the next user turn;
`tools`/`tool_choice`/`parallel_tool_calls` map to their Anthropic forms; `stop` becomes
`stop_sequences`; `max_tokens`, which Anthropic requires, defaults to the provider's setting.
Answers: text and `tool_use` blocks become `content` and `tool_calls`, stop reasons finish
reasons, usage OpenAI's usage with cache reads in `prompt_tokens_details.cached_tokens`
(`prompt_tokens` counts input, cache reads and cache writes), errors OpenAI's envelope.
Legacy completions are served as one user turn; embeddings are refused (Anthropic has none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from lmgate.adapters.anthropic_stream import (
    STOP_REASONS,
    AnthropicStream,
    anthropic_error,
    openai_usage,
)
from lmgate.adapters.base import (
    Context,
    UpstreamCall,
    chat_completion,
    openai_error,
    text_completion,
    text_of,
    unsupported,
)

API_VERSION = "2023-06-01"
_DATA_URL = re.compile(r"^data:([\w/+.-]+);base64,(.*)$", re.S)
_SAMPLING = ("temperature", "top_p")


@dataclass(frozen=True, slots=True)
class AnthropicOptions:
    """A provider's Anthropic settings: API version and the `max_tokens` used when not given."""

    version: str = API_VERSION
    default_max_tokens: int = 4096


class AnthropicAdapter:
    """OpenAI chat and legacy completions on Anthropic's Messages API."""

    passthrough = False

    def __init__(self, options: AnthropicOptions | None = None) -> None:
        self.options = options or AnthropicOptions()

    def auth_headers(self, api_key: str) -> dict[str, str]:
        """`x-api-key` and `anthropic-version` (the version even without a key)."""
        headers = {"anthropic-version": self.options.version}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    def build(
        self, kind: str, data: dict[str, Any], upstream_model: str, user: str | None
    ) -> UpstreamCall:
        """The Messages request for an OpenAI chat or completions request."""
        if kind == "embeddings":
            raise unsupported("Anthropic models have no embeddings.", "model")
        stream = data.get("stream") is True
        body = messages_request(data, upstream_model, self.options.default_max_tokens, kind)
        headers = {"Content-Type": "application/json"}
        return UpstreamCall("POST", "/messages", orjson.dumps(body), headers, stream)

    def response(self, kind: str, status: int, body: bytes, ctx: Context) -> tuple[int, bytes]:
        """Anthropic's complete answer as OpenAI's."""
        if status >= 400:
            return anthropic_error(status, body)
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            return openai_error(502, "Anthropic answered without a message.", code="bad_upstream")
        text, calls = _content(message["content"])
        reason = STOP_REASONS.get(str(message.get("stop_reason")), "stop")
        usage = openai_usage(message.get("usage"))
        if kind == "completions":
            return 200, orjson.dumps(text_completion(ctx, text, _no_tools(reason), usage))
        obj = chat_completion(ctx, text or (None if calls else ""), reason, calls, usage)
        return 200, orjson.dumps(obj)

    def stream(self, kind: str, ctx: Context) -> AnthropicStream:
        """A converter of Anthropic's event stream."""
        return AnthropicStream(ctx)


def messages_request(
    data: dict[str, Any], model: str, default_max_tokens: int, kind: str = "chat"
) -> dict[str, Any]:
    """An OpenAI chat (or completions) request as a Messages request."""
    _refuse_unsupported(data)
    if kind == "completions":
        prompt = data.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str):
            raise unsupported("Anthropic completes one text prompt per request.", "prompt")
        system, messages = None, [{"role": "user", "content": prompt}]
    else:
        system, messages = _messages(data.get("messages"))
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens or default_max_tokens,
    }
    if system:
        body["system"] = system
    for key in _SAMPLING:
        if data.get(key) is not None:
            body[key] = data[key]
    if isinstance(body.get("temperature"), int | float):
        body["temperature"] = min(body["temperature"], 1.0)  # OpenAI's range is 0-2
    stop = data.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if data.get("stream") is True:
        body["stream"] = True
    if isinstance(data.get("user"), str):
        body["metadata"] = {"user_id": data["user"]}
    _tools(data, body)
    return body


def _refuse_unsupported(data: dict[str, Any]) -> None:
    n = data.get("n")
    if isinstance(n, int) and n > 1:
        raise unsupported("Anthropic answers one choice per request.", "n")
    if data.get("logprobs"):
        raise unsupported("Anthropic gives no log probabilities.", "logprobs")
    fmt = data.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise unsupported("Anthropic has no JSON mode; use a tool instead.", "response_format")


def _tools(data: dict[str, Any], body: dict[str, Any]) -> None:
    tools = data.get("tools")
    if not tools:
        return
    converted = []
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise unsupported("Only function tools can be converted for Anthropic.", "tools")
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        out = {"name": fn.get("name"), "input_schema": schema}
        if fn.get("description"):
            out["description"] = fn["description"]
        converted.append(out)
    body["tools"] = converted
    choice = data.get("tool_choice")
    mapped: dict[str, Any] = {"type": "auto"}
    if choice == "required":
        mapped = {"type": "any"}
    elif choice == "none":
        mapped = {"type": "none"}
    elif isinstance(choice, dict):
        mapped = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    if data.get("parallel_tool_calls") is False and mapped["type"] != "none":
        mapped["disable_parallel_tool_use"] = True
    if choice is not None or "disable_parallel_tool_use" in mapped:
        body["tool_choice"] = mapped


def _messages(raw: object) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """The system blocks and the alternating user/assistant turns of OpenAI `messages`."""
    if not isinstance(raw, list) or not raw:
        raise unsupported("`messages` must be a non-empty list.", "messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), i, text_only=True))
            continue
        if role == "tool":
            blocks = [_tool_result(m)]
            role = "user"
        elif role == "user":
            blocks = _blocks(m.get("content"), i)
        elif role == "assistant":
            blocks = _assistant_blocks(m, i)
        else:
            raise unsupported(f"Unsupported message at messages[{i}].", f"messages[{i}]")
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)  # Anthropic wants the roles to alternate
        else:
            turns.append({"role": role, "content": blocks})
    return system or None, turns


def _blocks(content: object, i: int, text_only: bool = False) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise unsupported(f"Invalid content at messages[{i}].", f"messages[{i}].content")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            block = {"type": "text", "text": part.get("text", "")}
            if "cache_control" in part:
                block["cache_control"] = part["cache_control"]
            blocks.append(block)
        elif kind == "image_url" and not text_only:
            blocks.append(_image(part, i))
        else:
            raise unsupported(
                f"Content of type {kind!r} cannot be sent to Anthropic.", f"messages[{i}].content"
            )
    return blocks


def _image(part: dict[str, Any], i: int) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise unsupported("An image part needs a URL.", f"messages[{i}].content")
    match = _DATA_URL.match(url)
    if match:
        source = {"type": "base64", "media_type": match[1], "data": match[2]}
    elif url.startswith(("http://", "https://")):
        source = {"type": "url", "url": url}
    else:
        raise unsupported("Images must be data: or http(s) URLs.", f"messages[{i}].content")
    return {"type": "image", "source": source}


def _assistant_blocks(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    blocks = _blocks(m.get("content"), i, text_only=True)
    for call in m.get("tool_calls") or []:
        fn = call.get("function", {})
        try:
            arguments = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            raise unsupported(
                "Tool call arguments must be JSON.", f"messages[{i}].tool_calls"
            ) from None
        blocks.append(
            {"type": "tool_use", "id": call.get("id"), "name": fn.get("name"), "input": arguments}
        )
    return blocks


def _tool_result(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": m.get("tool_call_id"),
        "content": text_of(m.get("content")),
    }


def _content(blocks: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    """The text and OpenAI tool calls of a message's content blocks (thinking is dropped)."""
    texts, calls = [], []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            arguments = orjson.dumps(block.get("input", {})).decode()
            fn = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": fn})
    return "".join(texts), calls


def _no_tools(reason: str) -> str:
    return "stop" if reason == "tool_calls" else reason
