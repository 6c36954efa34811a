"""The response cache as the gateway uses it: plan, look up, record, commit.

Per request, after authentication and before forwarding (and before accounting, which adds
`stream_options` to stream requests):

    plan = cache.plan(kind, data, principal, cache_control, ttl_header)  # None: not cached
    hit = await cache.lookup(plan)          # CacheHit | None
    recorder = cache.recorder(plan)         # on a miss: watches the answer (an Observer)
    ...forward...
    await recorder.commit()                 # stores the answer if it was complete and 2xx

One entry serves both forms of a request: the complete JSON answer is stored (a stream is
rebuilt into it), and a stream request is answered by replaying it as SSE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from lmgate.accounting.usage import wants_usage
from lmgate.cache.assemble import assemble
from lmgate.cache.config import CacheSettings
from lmgate.cache.keys import CHAT, GENERATIVE, cache_key, request_policy
from lmgate.cache.memory import MemoryStore
from lmgate.cache.redis_store import RedisStore
from lmgate.cache.replay import stream_bytes
from lmgate.cache.store import CacheStore

if TYPE_CHECKING:
    from lmgate.auth.keys import Principal

CACHE_HEADER = b"x-lmgate-cache"
HIT = (CACHE_HEADER, b"hit")
MISS = (CACHE_HEADER, b"miss")
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"
_SSE_PER_BODY_BYTE = 16
"""A stream is recorded up to this many times `max_entry_bytes`: SSE repeats each chunk's
metadata, so it is several times larger than the answer it builds."""


@dataclass(slots=True)
class CachePlan:
    """What the cache does for one request."""

    kind: str
    """The endpoint: `/chat/completions`, `/completions` or `/embeddings`."""
    key: str
    lookup: bool
    """Answer from the cache if possible (false with `Cache-Control: no-cache`)."""
    store: bool
    """Store the upstream's answer (false with `x-lmgate-cache-ttl: 0`)."""
    ttl: int
    stream: bool
    """The client asked for a stream: a hit is replayed as SSE."""
    include_usage: bool
    """The client asked for the stream's usage chunk."""


@dataclass(slots=True)
class CacheHit:
    """A stored answer, ready to send."""

    body: bytes
    """The stored complete answer (JSON), e.g. for its `usage`."""
    content: bytes
    """The response body: `body` itself, or its replay as a whole SSE stream."""
    content_type: bytes


class ResponseCache:
    """Settings, a backend, and the per-request steps."""

    def __init__(self, settings: CacheSettings, backend: CacheStore) -> None:
        self.settings = settings
        self.backend = backend

    def scope_of(self, principal: Principal | None) -> str:
        """Who may share answers: `k<key id>`, `t<team id>` (`u<user id>` without a team) or
        `g` (also for every request when keys are not required)."""
        scope = self.settings.scope
        if principal is None or scope == "global":
            return "g"
        if scope == "team" and principal.team_id is not None:
            return f"t{principal.team_id}"
        return f"u{principal.user_id}" if scope == "team" else f"k{principal.key_id}"

    def plan(
        self,
        kind: str,
        data: dict[str, Any],
        principal: Principal | None,
        cache_control: bytes | str | None = None,
        ttl: bytes | str | None = None,
    ) -> CachePlan | None:
        """The plan for a request to `kind` with body `data`; None when the cache stays out.

        `cache_control` and `ttl` are the request's `Cache-Control` and `x-lmgate-cache-ttl`
        header values. Raises GatewayError 400 `invalid_cache_ttl`.
        """
        policy = request_policy(cache_control, ttl)
        if not (policy.lookup or policy.store):
            return None
        s = self.settings
        key = cache_key(
            kind, data, self.scope_of(principal), only_deterministic=s.only_deterministic
        )
        if key is None:
            return None
        stream = kind in GENERATIVE and data.get("stream") is True
        return CachePlan(
            kind,
            key,
            policy.lookup,
            policy.store,
            s.default_ttl if policy.ttl is None else policy.ttl,
            stream,
            stream and wants_usage(data),
        )

    async def lookup(self, plan: CachePlan) -> CacheHit | None:
        """The stored answer, as JSON or (for a stream request) as SSE; None on a miss."""
        if not plan.lookup:
            return None
        body = await self.backend.get(plan.key)
        if body is None:
            return None
        if not plan.stream:
            return CacheHit(body, body, JSON)
        answer = parse_answer(plan.kind, body)
        if answer is None:
            return None
        return CacheHit(body, stream_bytes(plan.kind, answer, plan.include_usage), SSE)

    def recorder(self, plan: CachePlan) -> Recorder | None:
        """An observer of the upstream's answer that can store it; None if it must not be."""
        return Recorder(self, plan) if plan.store else None

    async def put(self, plan: CachePlan, body: bytes) -> None:
        """Store a complete answer under the plan's key (if it is not too large)."""
        if len(body) <= self.settings.max_entry_bytes:
            await self.backend.set(plan.key, body, plan.ttl)

    async def close(self) -> None:
        """Close the backend."""
        await self.backend.close()


class Recorder:
    """Watches one answer (with the relay's Observer hooks) and stores it on `commit()`.

    Only a 2xx answer is stored: a complete JSON body, or a stream that ended with `[DONE]`
    and no error, rebuilt into the complete answer. The hooks are cheap: chunks are only
    kept (up to a bound) and parsed in `commit()`, after the client has its answer.
    """

    __slots__ = ("_body", "_broken", "_cache", "_chunks", "_limit", "_plan", "_size", "_status")

    def __init__(self, cache: ResponseCache, plan: CachePlan) -> None:
        self._cache = cache
        self._plan = plan
        self._status = 0
        self._body: bytes | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = cache.settings.max_entry_bytes * _SSE_PER_BODY_BYTE
        self._broken = False

    def attempt(self, dep: object) -> None:
        """Nothing to note before an attempt."""

    def answered(self, dep: object, status: int) -> None:
        """The upstream's status (the last one counts, after retries)."""
        self._status = status

    def body(self, body: bytes) -> None:
        """A complete non-streaming answer."""
        self._body = body

    def chunk(self, chunk: bytes) -> bytes:
        """A piece of a stream: kept, and returned unchanged."""
        if chunk and not self._broken:
            self._size += len(chunk)
            if self._size > self._limit:
                self._broken = True
                self._chunks.clear()
            else:
                self._chunks.append(chunk)
        return chunk

    def failed(self, error: object) -> None:
        """The stream broke: nothing is stored."""
        self._broken = True

    async def commit(self) -> None:
        """Store the answer if it is complete; call once the response is done (never raises
        for the backend's sake)."""
        answer = self._answer()
        self._body, self._chunks = None, []
        if answer is not None:
            await self._cache.put(self._plan, answer)

    def _answer(self) -> bytes | None:
        if self._broken or not 200 <= self._status < 300:
            return None
        kind = self._plan.kind
        if self._body is not None:
            return self._body if parse_answer(kind, self._body) is not None else None
        if not self._chunks or kind not in GENERATIVE:
            return None
        rebuilt = assemble(kind, b"".join(self._chunks))
        return orjson.dumps(rebuilt) if rebuilt is not None else None


def parse_answer(kind: str, body: bytes) -> dict[str, Any] | None:
    """`body` parsed, if it is an answer of endpoint `kind` fit to cache and replay."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or "error" in answer:
        return None
    if kind not in GENERATIVE:
        return answer if isinstance(answer.get("data"), list) else None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    field = "message" if kind == CHAT else "text"
    kind_type = dict if kind == CHAT else str
    if all(isinstance(c, dict) and isinstance(c.get(field), kind_type) for c in choices):
        return answer
    return None


def open_cache(settings: CacheSettings) -> ResponseCache | None:
    """The configured cache, or None when it is off. Connects lazily: Redis may be down."""
    if not settings.enabled:
        return None
    backend: CacheStore
    if settings.backend == "redis":
        assert settings.redis_url is not None  # checked by CacheSettings
        backend = RedisStore(
            settings.redis_url, prefix=settings.redis_prefix, timeout=settings.redis_timeout
        )
    else:
        backend = MemoryStore(settings.max_bytes)
    return ResponseCache(settings, backend)
