"""Token usage from upstream answers: JSON bodies and SSE streams, scanned without re-encoding."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import orjson

from lmgate.accounting.tokenizer import count_tokens
from lmgate.adapters.anthropic_stream import MessagesUsage, usage_from_message

_USAGE = b'"usage"'
_SEPS = (b"\n\n", b"\r\n\r\n")
_KEEP_BYTES = 64 * 1024
"""Bytes of a stream kept for estimation while no usage has been seen (then extrapolated)."""
_SPLICE = b'"stream_options":{"include_usage":true},'


@dataclass(slots=True)
class Usage:
    """Tokens of one request; `estimated` when counted by the gateway, not by the upstream."""

    prompt: int
    completion: int
    cached: int = 0
    reasoning: int = 0
    estimated: bool = False


def _int(v: object) -> int:
    return v if type(v) is int else 0


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def parse_usage(u: object) -> Usage | None:
    """An OpenAI `usage` object (chat, completions, embeddings or Responses API) as `Usage`."""
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u:
        prompt, completion = u["prompt_tokens"], u.get("completion_tokens")
        pdet, cdet = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    elif "input_tokens" in u:
        prompt, completion = u["input_tokens"], u.get("output_tokens")
        pdet, cdet = u.get("input_tokens_details"), u.get("output_tokens_details")
    else:
        return None
    return Usage(
        _int(prompt),
        _int(completion),
        _int(_dict(pdet).get("cached_tokens")),
        _int(_dict(cdet).get("reasoning_tokens")),
    )


def _usage_of(obj: object) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if u is None:  # Responses API events nest it: {"type": "response.completed", "response": ...}
        u = _dict(obj.get("response")).get("usage")
    return parse_usage(u)


def usage_from_body(body: bytes) -> Usage | None:
    """The usage of a non-streaming answer, or None when it has none (or is not JSON)."""
    if _USAGE not in body:
        return None
    try:
        return _usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def completion_text(body: bytes) -> str:
    """The generated text of a non-streaming chat or completions answer, for estimation."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    return "".join(_choice_texts(_dict(obj).get("choices"), "message"))


def _choice_texts(choices: object, key: str) -> list[str]:
    out: list[str] = []
    if not isinstance(choices, list):
        return out
    for c in choices:
        c = _dict(c)
        text = c.get("text")
        if isinstance(text, str):
            out.append(text)
        part = _dict(c.get(key))
        for field in ("content", "reasoning_content"):
            value = part.get(field)
            if isinstance(value, str):
                out.append(value)
    return out


def wants_usage(data: dict[str, Any]) -> bool:
    """True when the client itself asked for a stream's usage chunk."""
    options = data.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def inject_include_usage(data: dict[str, Any]) -> bool:
    """Ask for usage in a stream the client did not ask it for; True when `data` was changed.

    A True answer means the relay must strip the usage event (`StreamUsage(strip=True)`).
    """
    if data.get("stream") is not True or wants_usage(data):
        return False
    options = data.get("stream_options")
    base = options if isinstance(options, dict) else {}
    data["stream_options"] = {**base, "include_usage": True}
    return True


def splice_include_usage(raw: bytes) -> bytes | None:
    """`raw` with `stream_options.include_usage` added as bytes, without re-encoding the body.

    Only when the body has no `stream_options` key (the usual case); None means the caller must
    re-encode the dict changed by `inject_include_usage`.
    """
    if b'"stream_options"' in raw:
        return None
    i = raw.find(b"{")
    if i < 0 or raw.find(b'"', i) < 0:
        return None
    return raw[: i + 1] + _SPLICE + raw[i + 1 :]


def _event_bounds(data: bytes, at: int, end: int) -> tuple[int, int]:
    """Start and end (separator included) of the complete event of `data[:end]` holding `at`."""
    start = _after_last_separator(data, at)
    stop = data.find(b"\n\n", at, end)
    crlf = data.find(b"\r\n\r\n", at, end)
    if stop < 0 or 0 <= crlf < stop:
        return start, crlf + 4
    return start, stop + 2


def _event_json(event: bytes) -> object:
    lines = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


def _complete_end(data: bytes) -> int:
    """The length of the complete events at the start of `data` (0 if none is complete)."""
    if data.endswith(_SEPS):
        return len(data)
    return _after_last_separator(data, len(data))


def _after_last_separator(data: bytes, end: int) -> int:
    """Where the event holding `data[end - 1]` starts: just after the last blank line before."""
    lf = data.rfind(b"\n\n", 0, end)
    crlf = data.rfind(b"\r\n\r\n", 0, end)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class StreamUsage:
    """Watches an SSE stream, chunk by chunk, for the event that carries the usage.

    `feed` returns the bytes to forward. Without `strip` they are the chunk itself; with
    `strip` (the gateway asked for usage itself) complete events are forwarded as soon as
    they are whole, a partial event waits for its end, and the usage-only event
    (`"choices": []`) is removed. A chunk costs a search for the separator and one for
    `"usage"`; only an event with a non-null usage is parsed.

    For estimation when no usage ever arrives, the first 64 KiB of events are kept (as
    references to the chunks) and the stream's remaining bytes are extrapolated from them:
    exact for most answers, bounded memory for long ones. They are dropped once usage is seen.
    """

    __slots__ = ("_carry", "_kept", "_kept_bytes", "strip", "total_bytes", "usage")

    def __init__(self, *, strip: bool = False) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self.total_bytes = 0
        self._carry = b""
        self._kept: list[bytes] = []
        self._kept_bytes = 0

    def feed(self, chunk: bytes) -> bytes:
        """Scan `chunk`; return what to send to the client now (possibly `b""`)."""
        if self.usage is not None:
            if self._carry:  # held back only when stripping; already sent otherwise
                chunk, self._carry = (self._carry + chunk if self.strip else chunk), b""
            return chunk
        data = self._carry + chunk if self._carry else chunk
        end = _complete_end(data)
        self._carry = data[end:]
        if end == 0:
            return b"" if self.strip else chunk
        complete = data if end == len(data) else data[:end]
        self.total_bytes += end
        out = self._scan(complete)
        if self.usage is None and self._kept_bytes < _KEEP_BYTES:
            self._kept.append(complete)
            self._kept_bytes += end
        return out if self.strip else chunk

    def flush(self) -> bytes:
        """At the end of the stream: the bytes of an unterminated last event, if any."""
        rest, self._carry = self._carry, b""
        if rest and self.usage is None:
            rest = self._scan(rest + b"\n\n")[: len(rest)]  # b"" when it was the usage event
        return rest if self.strip else b""

    def _scan(self, data: bytes) -> bytes:
        """Find a non-null usage among complete events; return `data` without a stripped one."""
        at = data.find(_USAGE)
        while at >= 0:
            i = at + len(_USAGE)
            while data[i : i + 1] in (b":", b" "):
                i += 1
            if data[i : i + 1] == b"{":
                start, stop = _event_bounds(data, at, len(data))
                obj = _event_json(data[start:stop])
                usage = _usage_of(obj)
                if usage is not None:
                    self.usage = usage
                    self._kept = []
                    if self.strip and _dict(obj).get("choices") == []:
                        return data[:start] + data[stop:]
                    return data
            at = data.find(_USAGE, i)
        return data

    def estimate_completion_tokens(self, model: str | None = None) -> int:
        """Completion tokens counted from the streamed text (when the upstream sent no usage)."""
        texts: list[str] = []
        for block in self._kept:
            for event in block.replace(b"\r\n", b"\n").split(b"\n\n"):
                obj = _dict(_event_json(event)) if event.strip() else {}
                texts.extend(_choice_texts(obj.get("choices"), "delta"))
        tokens = count_tokens("".join(texts), model)
        if self._kept_bytes and self.total_bytes > self._kept_bytes:
            tokens = round(tokens * self.total_bytes / self._kept_bytes)
        return tokens


# -- Anthropic's Messages format (`/v1/messages` passed to an Anthropic provider as is) ----------


def usage_from_messages_body(body: bytes) -> Usage | None:
    """The usage of a Message: prompt = input + cache reads + cache writes, cached = reads."""
    return parse_usage(usage_from_message(body))


class MessagesStreamUsage:
    """`StreamUsage` for a Messages event stream: reads its usage, forwards the bytes as they are.

    `message_start` carries the input tokens (cache reads and writes included) and
    `message_delta` the cumulative output; `parse_usage` on either event alone gets it wrong.
    """

    __slots__ = ("_reader",)

    def __init__(self) -> None:
        self._reader = MessagesUsage()

    def feed(self, chunk: bytes) -> bytes:
        """Scan `chunk`; return it unchanged."""
        with contextlib.suppress(ValueError, TypeError, AttributeError):  # a malformed event
            self._reader.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        """Nothing is ever held back."""
        return b""

    @property
    def usage(self) -> Usage | None:
        """The usage seen so far, or None."""
        return parse_usage(self._reader.usage)

    def estimate_completion_tokens(self, model: str | None = None) -> int:
        """Anthropic always reports its usage: nothing to estimate from."""
        return 0
