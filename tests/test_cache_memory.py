"""The in-memory backend: bounded by bytes, least recently used evicted first, entries expire."""

from __future__ import annotations

from lmgate.cache.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_get_and_set() -> None:
    store = MemoryStore(1000)
    assert await store.get("a") is None
    await store.set("a", b"one", 10)
    assert await store.get("a") == b"one"
    await store.set("a", b"three", 10)
    assert await store.get("a") == b"three"
    assert len(store) == 1 and store.size == len("a") + len(b"three")


async def test_size_bound_evicts_least_recently_used() -> None:
    store = MemoryStore(30)  # room for three entries of 1 + 9 bytes
    for k in "abc":
        await store.set(k, b"x" * 9, 10)
    assert await store.get("a") is not None  # "a" becomes the most recently used
    await store.set("d", b"x" * 9, 10)
    assert await store.get("b") is None
    assert [k for k in "acd" if k in store._entries] == ["a", "c", "d"]
    assert store.size == 30

    await store.set("big", b"y" * 24, 10)  # needs the room of three entries
    assert len(store) == 1 and store.size == 27


async def test_value_larger_than_the_store_is_not_kept() -> None:
    store = MemoryStore(10)
    await store.set("a", b"1234", 10)
    await store.set("b", b"x" * 20, 10)
    assert await store.get("b") is None
    assert await store.get("a") == b"1234"


async def test_ttl() -> None:
    clock = Clock()
    store = MemoryStore(1000, clock)
    await store.set("a", b"1", 5)
    await store.set("b", b"2", 60)
    await store.set("zero", b"3", 0)
    clock.now += 4.9
    assert await store.get("a") == b"1"
    clock.now += 0.2
    assert await store.get("a") is None
    assert await store.get("b") == b"2"
    assert await store.get("zero") is None
    assert len(store) == 1 and store.size == 2


async def test_close_empties() -> None:
    store = MemoryStore(100)
    await store.set("a", b"1", 5)
    await store.close()
    assert len(store) == 0 and store.size == 0
