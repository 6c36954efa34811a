"""The cache as the gateway drives it, without the gateway: plan, lookup, recorder, commit —
hit and miss, scopes, TTL, no-cache and no-store, streams recorded and replayed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from lmgate.auth.keys import Principal
from lmgate.cache.config import CacheSettings
from lmgate.cache.keys import CHAT, EMBEDDINGS
from lmgate.cache.memory import MemoryStore
from lmgate.cache.service import CachePlan, ResponseCache, open_cache
from lmgate.testing.stub import RunningStub, StubOptions, start_stub
from tests.infra.openapi import validate

REQUEST: dict[str, Any] = {
    "model": "m1",
    "messages": [{"role": "user", "content": "one two three"}],
    "temperature": 0,
}
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "four five", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8},
}
BODY = orjson.dumps(ANSWER)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def principal(key_id: int, user_id: int = 1, team_id: int | None = 5) -> Principal:
    return Principal(
        key_id=key_id,
        prefix="lmg-x",
        secret_hash="h",
        user_id=user_id,
        user_name="u",
        team_id=team_id,
        team_name=None if team_id is None else f"team{team_id}",
        expires_at=None,
        allowed_models=None,
        log_bodies=False,
        limits=None,
    )


def cache(clock: Clock | None = None, **settings: Any) -> ResponseCache:
    s = CacheSettings(enabled=True, **settings)
    return ResponseCache(s, MemoryStore(s.max_bytes, clock or Clock()))


def plan_of(
    c: ResponseCache,
    data: dict[str, Any] = REQUEST,
    who: Principal | None = None,
    cc: str | None = None,
    ttl: str | None = None,
) -> CachePlan:
    plan = c.plan(CHAT, data, who, cc, ttl)
    assert plan is not None
    return plan


async def answer(c: ResponseCache, plan: CachePlan, body: bytes = BODY, status: int = 200) -> None:
    """What the gateway does on a miss: the recorder watches the answer, then commits."""
    recorder = c.recorder(plan)
    assert recorder is not None
    recorder.answered(None, status)
    recorder.body(body)
    await recorder.commit()


async def test_miss_then_hit() -> None:
    c = cache()
    plan = plan_of(c)
    assert await c.lookup(plan) is None
    await answer(c, plan)
    hit = await c.lookup(plan_of(c, {**REQUEST, "user": "someone-else"}))
    assert hit is not None
    assert hit.body == hit.content == BODY and hit.content_type == b"application/json"


async def test_errors_and_bad_bodies_are_not_stored() -> None:
    c = cache()
    plan = plan_of(c)
    await answer(c, plan, status=201)
    await c.backend.close()
    for body, status in [
        (BODY, 500),
        (b'{"error": {"message": "x"}}', 200),
        (b"not json", 200),
        (b'{"choices": []}', 200),
    ]:
        await answer(c, plan, body, status)
        assert await c.lookup(plan) is None
    recorder = c.recorder(plan)
    assert recorder is not None
    await recorder.commit()  # nothing seen: nothing stored
    assert await c.lookup(plan) is None


async def test_scopes() -> None:
    alice_laptop, alice_phone = principal(1, user_id=1), principal(2, user_id=1)
    bob_same_team, carol_no_team = principal(3, user_id=2), principal(4, user_id=3, team_id=None)

    by_key = cache(scope="key")
    await answer(by_key, plan_of(by_key, who=alice_laptop))
    assert await by_key.lookup(plan_of(by_key, who=alice_laptop)) is not None
    assert await by_key.lookup(plan_of(by_key, who=alice_phone)) is None

    by_team = cache(scope="team")
    await answer(by_team, plan_of(by_team, who=alice_laptop))
    assert await by_team.lookup(plan_of(by_team, who=bob_same_team)) is not None
    assert await by_team.lookup(plan_of(by_team, who=carol_no_team)) is None
    assert by_team.scope_of(carol_no_team) == "u3"  # without a team: the user's own

    shared = cache(scope="global")
    await answer(shared, plan_of(shared, who=alice_laptop))
    assert await shared.lookup(plan_of(shared, who=carol_no_team)) is not None
    assert await shared.lookup(plan_of(shared)) is not None  # no keys required


async def test_ttl_default_and_per_request() -> None:
    clock = Clock()
    c = cache(clock, default_ttl=60)
    await answer(c, plan_of(c))
    short = {**REQUEST, "seed": 1}
    await answer(c, plan_of(c, short, ttl="2"))
    clock.now += 3
    assert await c.lookup(plan_of(c, short)) is None
    assert await c.lookup(plan_of(c)) is not None
    clock.now += 60
    assert await c.lookup(plan_of(c)) is None


async def test_ttl_zero_does_not_store() -> None:
    c = cache()
    plan = plan_of(c, ttl="0")
    assert plan.lookup and not plan.store and c.recorder(plan) is None


async def test_no_cache_refreshes_and_no_store_stays_out() -> None:
    c = cache()
    await answer(c, plan_of(c))
    refresh = plan_of(c, cc="no-cache")
    assert await c.lookup(refresh) is None
    newer = orjson.dumps({**ANSWER, "id": "chatcmpl-2"})
    await answer(c, refresh, newer)
    hit = await c.lookup(plan_of(c))
    assert hit is not None and hit.body == newer
    assert c.plan(CHAT, REQUEST, None, "no-store", None) is None


async def test_not_cached() -> None:
    c = cache()
    assert c.plan(CHAT, {**REQUEST, "temperature": 0.7}, None) is None
    assert cache(only_deterministic=False).plan(CHAT, {**REQUEST, "temperature": 0.7}, None)
    assert open_cache(CacheSettings()) is None


async def test_entry_size_bound() -> None:
    c = cache(max_entry_bytes=len(BODY) - 1)
    await answer(c, plan_of(c))
    assert await c.lookup(plan_of(c)) is None


async def test_embeddings() -> None:
    c = cache()
    data = {"model": "e", "input": "hi"}
    plan = c.plan(EMBEDDINGS, {**data, "stream": True}, None)
    assert plan is not None and not plan.stream
    body = b'{"object":"list","data":[{"embedding":[0.1]}]}'
    await answer(c, plan, body)
    hit = await c.lookup(plan)
    assert hit is not None and hit.content == body


@pytest.mark.parametrize("include_usage", [False, True])
async def test_stream_request_replays_a_complete_answer(include_usage: bool) -> None:
    c = cache()
    await answer(c, plan_of(c))
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    plan = plan_of(c, {**REQUEST, "stream": True, **options})
    assert plan.stream and plan.include_usage is include_usage
    hit = await c.lookup(plan)
    assert hit is not None and hit.body == BODY
    assert hit.content_type.startswith(b"text/event-stream")
    blocks = hit.content.split(b"\n\n")
    assert blocks[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(b[6:]) for b in blocks[:-2]]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert text == "four five"
    assert (chunks[-1].get("usage") == ANSWER["usage"]) is include_usage


async def test_stored_garbage_is_a_miss_for_streams() -> None:
    c = cache()
    plan = plan_of(c, {**REQUEST, "stream": True})
    await c.backend.set(plan.key, b"garbage", 60)
    assert await c.lookup(plan) is None
    assert await c.lookup(plan_of(c)) is not None  # non-streams are sent as stored


@pytest.fixture
async def stub() -> AsyncIterator[RunningStub]:
    running = await start_stub(StubOptions())
    yield running
    await running.close()


async def record_stream(
    c: ResponseCache, plan: CachePlan, stub: RunningStub, body: dict[str, Any]
) -> None:
    """Feed the stub's real SSE, as it arrives, to a recorder, then commit (as the gateway
    does, also when the upstream broke off)."""
    recorder = c.recorder(plan)
    assert recorder is not None
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stub.url}/chat/completions", json=body) as r:
            recorder.answered(None, r.status)
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for piece in r.content.iter_any():
                    assert recorder.chunk(piece) is piece
        recorder.chunk(b"")
        await recorder.commit()


async def test_recorded_stream_answers_both_forms(stub: RunningStub) -> None:
    c = cache()
    usage = {"stream_options": {"include_usage": True}}
    body = {**REQUEST, "stream": True, "stub": {"chunks": 3}, **usage}
    await record_stream(c, plan_of(c, body), stub, body)
    plain = await c.lookup(plan_of(c, {**REQUEST, "stub": {"chunks": 3}}))
    assert plain is not None
    stored = orjson.loads(plain.content)
    validate("CreateChatCompletionResponse", stored)
    assert stored["choices"][0]["message"]["content"].endswith("one two three")
    assert stored["usage"]["completion_tokens"] == 9
    assert await c.lookup(plan_of(c, body)) is not None


async def test_broken_or_oversized_streams_are_not_stored(stub: RunningStub) -> None:
    c = cache()
    broken = {**REQUEST, "stream": True, "stub": {"drop_after": 2}}
    plan = plan_of(c, broken)
    await record_stream(c, plan, stub, broken)
    assert await c.lookup(plan) is None

    failed = c.recorder(plan)
    assert failed is not None
    failed.answered(None, 200)
    failed.chunk(b'data: {"choices":[]}\n\n')
    failed.failed(None)
    await failed.commit()
    assert await c.lookup(plan) is None

    tiny = cache(max_entry_bytes=10)
    body = {**REQUEST, "stream": True}
    await record_stream(tiny, plan_of(tiny, body), stub, body)
    assert await tiny.lookup(plan_of(tiny, body)) is None
