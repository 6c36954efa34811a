"""The Redis backend against a real Redis (LMGATE_TEST_REDIS, default redis://127.0.0.1:6379/0;
skipped when unreachable, failed when CI=true), and a Redis that is down: a miss, never an
error."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import redis
from redis.asyncio import Redis

from lmgate.cache.config import CacheSettings
from lmgate.cache.keys import CHAT
from lmgate.cache.redis_store import RedisStore
from lmgate.cache.service import ResponseCache

REDIS_URL = os.environ.get("LMGATE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except (redis.RedisError, OSError) as e:
        message = f"Redis at {REDIS_URL} is unreachable: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return REDIS_URL


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A store under a prefix of its own; its keys are deleted afterwards."""
    s = RedisStore(redis_url, prefix=f"lmgate:test:{secrets.token_hex(6)}:")
    yield s
    await s.close()
    client = Redis.from_url(redis_url)
    async for k in client.scan_iter(match=f"{s.prefix}*"):
        await client.delete(k)
    await client.aclose()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_set_get_and_prefix(store: RedisStore, redis_url: str) -> None:
    assert await store.get("k") is None
    await store.set("k", b"\x00answer\xff", 60)
    assert await store.get("k") == b"\x00answer\xff"
    client = Redis.from_url(redis_url)
    try:
        assert 0 < await client.ttl(f"{store.prefix}k") <= 60
    finally:
        await client.aclose()


async def test_expiry(store: RedisStore) -> None:
    await store.set("k", b"v", 1)
    await store.set("zero", b"v", 0)
    assert await store.get("k") == b"v"
    await asyncio.sleep(1.1)
    assert await store.get("k") is None
    assert await store.get("zero") is None


async def test_replicas_share_entries(store: RedisStore, redis_url: str) -> None:
    other = RedisStore(redis_url, prefix=store.prefix)
    try:
        await store.set("shared", b"v", 60)
        assert await other.get("shared") == b"v"
    finally:
        await other.close()


async def test_redis_down_is_a_miss(caplog: pytest.LogCaptureFixture) -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", retry_after=0.2, log_interval=60)
    caplog.set_level(logging.WARNING, "lmgate.cache")
    try:
        start = time.perf_counter()
        assert await store.get("k") is None
        await store.set("k", b"v", 60)
        for _ in range(100):
            assert await store.get("k") is None  # resting: Redis is not even asked
        assert time.perf_counter() - start < 0.5
        await asyncio.sleep(0.25)
        assert await store.get("k") is None  # tried again, failed again
    finally:
        await store.close()
    warnings = [r for r in caplog.records if r.name == "lmgate.cache"]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()


async def test_unresponsive_redis_times_out_quickly() -> None:
    """A server that accepts connections but never answers costs one timeout, then a rest."""
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout=0.1)
    try:
        start = time.perf_counter()
        assert await store.get("k") is None
        assert await store.get("k") is None
        assert time.perf_counter() - start < 0.5
    finally:
        await store.close()
        listener.close()


async def test_two_replicas_share_answers(store: RedisStore, redis_url: str) -> None:
    """What one gateway stores, another (with its own connection pool) answers from."""
    settings = CacheSettings(enabled=True, backend="redis", redis_url=redis_url)
    first = ResponseCache(settings, store)
    second = ResponseCache(settings, RedisStore(redis_url, prefix=store.prefix))
    request = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "seed": 3}
    body = orjson.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 1,
            "model": "m1",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "yo"},
                    "finish_reason": "stop",
                }
            ],
        }
    )
    plan = first.plan(CHAT, request, None)
    assert plan is not None
    recorder = first.recorder(plan)
    assert recorder is not None
    recorder.answered(None, 200)
    recorder.body(body)
    await recorder.commit()
    try:
        other = second.plan(CHAT, {**request, "stream": True}, None)
        assert other is not None
        hit = await second.lookup(other)
        assert hit is not None and hit.body == body and b'"content":"yo"' in hit.content
    finally:
        await second.close()
