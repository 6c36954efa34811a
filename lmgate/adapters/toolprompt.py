"""Function calling for models without it, through a prompt convention.

The tools are described in the system prompt, and the model is asked to answer a call as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Earlier calls and their results are written back into the conversation the same way
(`<tool_call>` in the assistant's turn, `<tool_result>` in a user turn). Parsing is lenient:
a missing closing tag, a code fence around the JSON, `arguments` given as a string or named
`parameters`, several calls, or (when no tag was used) a bare JSON call of a known tool.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

from lmgate.adapters.base import text_of

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """A model's reply split into its text and its tool calls (OpenAI `tool_calls` objects)."""

    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def instructions(tools: list[dict[str, Any]], tool_choice: object) -> str:
    """The system prompt text describing `tools` (OpenAI function tools) and the convention."""
    specs = []
    for tool in tools:
        fn = tool.get("function", {}) if isinstance(tool, dict) else {}
        spec = {k: fn[k] for k in ("name", "description", "parameters") if k in fn}
        specs.append(orjson.dumps(spec).decode())
    lines = [
        "You can call the following tools. Each is described by a JSON object:",
        *specs,
        "",
        "To call a tool, answer with one block per call, exactly in this form:",
        OPEN,
        '{"name": "<tool name>", "arguments": {<arguments as a JSON object>}}',
        CLOSE,
        "You may write text before the calls, but nothing after them. "
        "Tool results come back in <tool_result> blocks.",
    ]
    if tool_choice == "required":
        lines.append("You must call at least one tool.")
    elif isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name")
        lines.append(f"You must call the tool {name}.")
    return "\n".join(lines)


def render_call(call: dict[str, Any]) -> str:
    """An OpenAI tool call written in the convention (for the conversation history)."""
    fn = call.get("function", {})
    raw = fn.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw)
    except orjson.JSONDecodeError:
        arguments = raw
    body = orjson.dumps({"name": fn.get("name"), "arguments": arguments}).decode()
    return f"{OPEN}\n{body}\n{CLOSE}"


def render_result(message: dict[str, Any]) -> str:
    """An OpenAI `tool` message as a `<tool_result>` block."""
    call_id = message.get("tool_call_id", "")
    return (
        f'<tool_result tool_call_id="{call_id}">\n{text_of(message.get("content"))}\n</tool_result>'
    )


def parse(text: str, names: tuple[str, ...]) -> ParsedReply:
    """Split a reply into text and tool calls of the tools in `names`."""
    calls: list[dict[str, Any]] = []
    if OPEN in text:
        head = text[: text.index(OPEN)]
        for block in _BLOCK.findall(text):
            calls.extend(_calls(block, names, strict=False))
        if not calls:
            return ParsedReply(text)
        return ParsedReply(head.strip() or None, calls)
    calls = _calls(text.strip(), names, strict=True)
    return ParsedReply(None, calls) if calls else ParsedReply(text)


def _calls(block: str, names: tuple[str, ...], strict: bool) -> list[dict[str, Any]]:
    """The calls in one block: a JSON object or a list of them, maybe fenced.

    `strict` (untagged text) also requires every call to name a known tool.
    """
    block = _FENCE.sub("", block.strip())
    try:
        value = orjson.loads(block)
    except orjson.JSONDecodeError:
        value = _first_json_object(block)
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    valid = [c for c in calls if c is not None]
    return [] if strict and len(valid) != len(calls) else valid


def _call(item: object, names: tuple[str, ...]) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        return None
    inner = item.get("function")
    fn: dict[str, Any] = inner if isinstance(inner, dict) else item
    name = fn.get("name")
    if not isinstance(name, str) or (names and name not in names):
        return None
    arguments = fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = orjson.dumps(arguments).decode()
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _first_json_object(text: str) -> object:
    """The first balanced `{...}` in `text` that parses, or None."""
    start = text.find("{")
    while start >= 0:
        depth, in_string, escaped = 0, False, False
        for i in range(start, len(text)):
            ch = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch in "{}":
                depth += 1 if ch == "{" else -1
                if depth == 0:
                    try:
                        return orjson.loads(text[start : i + 1])
                    except orjson.JSONDecodeError:
                        break
        start = text.find("{", start + 1)
    return None


class StreamSplitter:
    """Streams a reply's text while holding back what may be tool calls, parsed at the end.

    Text is passed on at once, except a tail that could be the start of `<tool_call>`; from
    a `<tool_call>` on (or from the start, when the reply opens like bare JSON) everything is
    held and parsed by `finish`.
    """

    __slots__ = ("_held", "_holding", "_names", "_seen_text")

    def __init__(self, names: tuple[str, ...]) -> None:
        self._names = names
        self._held = ""
        self._holding = False
        self._seen_text = False

    def feed(self, text: str) -> str:
        """The text that is safe to send now."""
        data = self._held + text
        if self._holding:
            self._held = data
            return ""
        if not self._seen_text:
            stripped = data.lstrip()
            if not stripped:
                self._held = data
                return ""
            if stripped[0] in "{[`":
                self._holding, self._held = True, data
                return ""
            self._seen_text = True
        at = data.find(OPEN)
        if at >= 0:
            self._holding, self._held = True, data[at:]
            return data[:at]
        keep = _partial_tag(data)
        self._held = data[len(data) - keep :] if keep else ""
        return data[: len(data) - keep]

    def finish(self) -> ParsedReply:
        """The held text: tool calls, or plain text if it held none."""
        held, self._held = self._held, ""
        if not held:
            return ParsedReply(None)
        if not self._holding:
            return ParsedReply(held)
        return parse(held, self._names)


def _partial_tag(text: str) -> int:
    """The length of the longest suffix of `text` that begins `<tool_call>`."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
