"""A complete answer rebuilt from the SSE stream that delivered it, to be cached once.

Chunks are merged in order: text fields (`content`, `arguments`, `text`, ...) are appended,
lists of objects that carry an `index` (choices, tool calls) are merged element by element,
other lists are extended, objects are merged recursively, and any other value replaces the
previous one (null never does). A stream that is not plainly a finished OpenAI stream (an
error event, invalid JSON, no `[DONE]`, a choice without `finish_reason`) gives None.
"""

from __future__ import annotations

from typing import Any

import orjson

from lmgate.cache.keys import CHAT

_APPENDED = frozenset({"content", "refusal", "reasoning_content", "reasoning", "arguments", "text"})
_CHUNK_ONLY = frozenset({"obfuscation"})


def assemble(kind: str, sse: bytes) -> dict[str, Any] | None:
    """The `chat.completion` (or `text_completion`) object that `sse` streamed, or None."""
    acc: dict[str, Any] = {}
    done = False
    for payload in _data(sse):
        if payload == b"[DONE]":
            done = True
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(event, dict) or "error" in event:
            return None
        _merge(acc, event)
    if not done:
        return None
    return _complete(kind, acc)


def _data(sse: bytes) -> list[bytes]:
    """The `data` of each event (multi-line data joined by newlines); comments are skipped."""
    out = []
    for block in sse.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


def _merge(into: dict[str, Any], event: dict[str, Any]) -> None:
    for key, value in event.items():
        if value is None:
            into.setdefault(key, None)
            continue
        old = into.get(key)
        if isinstance(value, str) and isinstance(old, str) and key in _APPENDED:
            into[key] = old + value
        elif isinstance(value, dict) and isinstance(old, dict):
            _merge(old, value)
        elif isinstance(value, list) and isinstance(old, list):
            _merge_list(old, value)
        else:
            into[key] = value


def _merge_list(into: list[Any], items: list[Any]) -> None:
    if not all(isinstance(i, dict) and type(i.get("index")) is int for i in items):
        into.extend(items)
        return
    by_index = {i.get("index"): i for i in into if isinstance(i, dict)}
    for item in items:
        old = by_index.get(item["index"])
        if old is None:
            into.append(item)
            by_index[item["index"]] = item
        else:
            _merge(old, item)


def _complete(kind: str, acc: dict[str, Any]) -> dict[str, Any] | None:
    choices = acc.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    if not all(isinstance(c, dict) and isinstance(c.get("finish_reason"), str) for c in choices):
        return None
    chat = kind == CHAT
    finished = [_chat_choice(c) if chat else _text_choice(c) for c in choices]
    answer = {k: v for k, v in acc.items() if k not in _CHUNK_ONLY and v is not None}
    answer["object"] = "chat.completion" if chat else "text_completion"
    answer["choices"] = sorted(finished, key=lambda c: c.get("index", 0))
    return answer


def _chat_choice(choice: dict[str, Any]) -> dict[str, Any]:
    delta = choice.get("delta") or {}
    message = {
        "role": delta.pop("role", "assistant"),
        "content": delta.pop("content", None),
        "refusal": delta.pop("refusal", None),  # required, as content, in a chat.completion
        **delta,
    }
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        ordered = sorted((c for c in calls if isinstance(c, dict)), key=lambda c: c.get("index", 0))
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in ordered]
    return {
        "index": choice.get("index", 0),
        "message": message,
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice["finish_reason"],
    }


def _text_choice(choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "text": choice.get("text", ""),
        "index": choice.get("index", 0),
        "logprobs": choice.get("logprobs"),
        "finish_reason": choice["finish_reason"],
    }
