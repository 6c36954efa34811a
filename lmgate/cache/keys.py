"""Which requests are cached, under which key, and what a request's headers ask of the cache.

A key is the SHA-256 of the request body with its keys sorted and the fields that cannot change
the answer removed, prefixed by the endpoint and by the scope that may share the answer.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import orjson

from lmgate.api.errors import GatewayError

CHAT = "/chat/completions"
COMPLETIONS = "/completions"
EMBEDDINGS = "/embeddings"
GENERATIVE = frozenset({CHAT, COMPLETIONS})
"""Endpoints whose answers can be replayed as a stream."""
KINDS = GENERATIVE | {EMBEDDINGS}

IGNORED_FIELDS = frozenset(
    {
        "stream",  # a stream is replayed from the complete answer
        "stream_options",  # only shapes the stream (usage chunk)
        "timeout",  # the gateway's own, removed before forwarding
        "user",  # end-user id for abuse monitoring
        "safety_identifier",  # its successor
        "metadata",  # tags for stored completions
        "store",  # whether the provider keeps the completion
        "prompt_cache_key",  # a hint for the provider's prompt cache
    }
)
"""Request fields that do not change the answer. Any other field, known or not, is in the key."""

_VERSION = b"lmgate-cache/1\n"
_MAX_TTL_DIGITS = 10


class Policy(NamedTuple):
    """What one request's headers allow: read a stored answer, store the new one, for how long."""

    lookup: bool
    store: bool
    ttl: int | None
    """Seconds from `x-lmgate-cache-ttl`; None: the configured default."""


def deterministic(data: dict[str, Any]) -> bool:
    """True for `temperature: 0` or an integer `seed`: a repeated request expects one answer."""
    temperature = data.get("temperature")
    seed = data.get("seed")
    return (type(temperature) in (int, float) and temperature == 0) or type(seed) is int


def cache_key(
    kind: str, data: dict[str, Any], scope_id: str, *, only_deterministic: bool = True
) -> str | None:
    """The key of a request to endpoint `kind` (e.g. `/chat/completions`); None if not cached.

    Not cached: other endpoints, audio output, and (with `only_deterministic`) chat and
    completions requests that are neither at temperature 0 nor seeded. Fields set to null
    count as absent, as the API treats them.
    """
    if kind not in KINDS or "audio" in data:
        return None
    if only_deterministic and kind in GENERATIVE and not deterministic(data):
        return None
    relevant = {k: v for k, v in data.items() if v is not None and k not in IGNORED_FIELDS}
    try:
        encoded = orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return None
    digest = hashlib.sha256(b"".join((_VERSION, kind.encode(), b"\n", encoded))).hexdigest()
    return f"{scope_id}:{digest}"


def request_policy(cache_control: bytes | str | None, ttl: bytes | str | None) -> Policy:
    """The request's `Cache-Control` and `x-lmgate-cache-ttl` header values as a `Policy`.

    `no-store`: neither read nor write. `no-cache`: do not answer from the cache, but store
    the new answer. `x-lmgate-cache-ttl: N`: keep the answer N seconds (0: do not store).
    An invalid TTL is a 400 `invalid_cache_ttl`.
    """
    lookup = True
    if cache_control:
        text = (
            cache_control.decode("latin-1") if isinstance(cache_control, bytes) else cache_control
        )
        directives = {d.split("=", 1)[0].strip().lower() for d in text.split(",")}
        if "no-store" in directives:
            return Policy(False, False, None)
        lookup = "no-cache" not in directives
    seconds = None if ttl is None else _ttl(ttl)
    return Policy(lookup, seconds != 0, seconds)


def _ttl(value: bytes | str) -> int:
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_TTL_DIGITS):
        raise GatewayError(
            400,
            f"Invalid x-lmgate-cache-ttl {text[:40]!r}: give whole seconds, 0 or more.",
            code="invalid_cache_ttl",
        )
    return int(text)
