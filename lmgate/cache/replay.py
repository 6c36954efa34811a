"""A stored complete answer replayed as the SSE stream OpenAI would have sent for it.

Chat: per choice a role chunk, one chunk with the whole content (and tool calls, refusal,
logprobs...), a finish chunk; then the usage chunk if the client asked for it; then
`data: [DONE]`. Legacy completions: per choice a text chunk and a finish chunk.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmgate.cache.keys import CHAT

DONE = b"data: [DONE]\n\n"
_NOT_META = frozenset({"object", "choices", "usage"})


def stream_bytes(kind: str, answer: dict[str, Any], include_usage: bool) -> bytes:
    """The SSE bytes of `answer` (a `chat.completion` or `text_completion` object)."""
    chat = kind == CHAT
    meta = {
        "object": "chat.completion.chunk" if chat else "text_completion",
        **{k: v for k, v in answer.items() if k not in _NOT_META},
    }
    if include_usage:
        meta["usage"] = None
    events: list[dict[str, Any]] = []
    for choice in answer["choices"]:
        pieces = _chat_choice(choice) if chat else _text_choice(choice)
        events.extend({**meta, "choices": [piece]} for piece in pieces)
    usage = answer.get("usage")
    if include_usage and usage is not None:
        events.append({**meta, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + DONE


def _chat_choice(choice: dict[str, Any]) -> list[dict[str, Any]]:
    index = choice.get("index", 0)
    message: dict[str, Any] = choice.get("message") or {}
    content = message.get("content")
    role = {
        "role": message.get("role", "assistant"),
        "content": "" if content is not None else None,
    }
    rest = {k: v for k, v in message.items() if k != "role" and v not in (None, "", [])}
    if "tool_calls" in rest:
        rest["tool_calls"] = [{"index": i, **call} for i, call in enumerate(rest["tool_calls"])]
    logprobs = choice.get("logprobs")
    out = [_delta(index, role, None, None)]
    if rest or logprobs is not None:
        out.append(_delta(index, rest, logprobs, None))
    out.append(_delta(index, {}, None, choice.get("finish_reason")))
    return out


def _delta(
    index: int, delta: dict[str, Any], logprobs: object, finish_reason: object
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def _text_choice(choice: dict[str, Any]) -> list[dict[str, Any]]:
    index = choice.get("index", 0)
    text = {"text": choice.get("text", ""), "index": index, "logprobs": choice.get("logprobs")}
    return [
        {**text, "finish_reason": None},
        {
            "text": "",
            "index": index,
            "logprobs": None,
            "finish_reason": choice.get("finish_reason"),
        },
    ]
