"""A lean Redis client for the hot path: one pipelined connection, hiredis to parse replies.

redis-py's asyncio client costs about 200 µs of CPU per command here; the rate limiter
sends one script call per request, so it uses this instead (measured in
docs/performance.md). Commands are written as they come and their replies matched in
order, so concurrent requests share one connection without waiting for each other.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class RespError(Exception):
    """Redis answered with an error, or the connection failed."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=RespError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            fut = self.waiting.popleft()
            if not fut.done():
                if isinstance(reply, RespError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(RespError("connection to Redis lost"))


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class RespClient:
    """`redis://[:password@]host:port/db`, one connection, opened on first use."""

    def __init__(self, url: str, timeout: float = 0.5) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command and wait (at most `timeout` seconds) for its reply."""
        proto = await self._connection()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.waiting.append(fut)
        assert proto.transport is not None
        proto.transport.write(_encode(args))
        try:
            async with asyncio.timeout(self.timeout):
                return await fut
        except TimeoutError:
            self._drop()  # replies are matched in order: after a timeout, start afresh
            raise RespError("Redis did not answer in time") from None

    async def evalsha(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """Run a Lua script by its hash, loading it first if the server does not know it."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RespError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._proto is not None and not self._proto.lost:
                return self._proto
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(self.timeout):
                    _, proto = await loop.create_connection(_Protocol, self.host, self.port)
            except (OSError, TimeoutError) as e:
                raise RespError(f"cannot connect to Redis: {type(e).__name__}") from None
            self._proto = proto
            if self.password:
                await self.execute("AUTH", self.password)
            if self.db:
                await self.execute("SELECT", self.db)
            return proto

    def _drop(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.abort()
        self._proto = None

    async def close(self) -> None:
        self._drop()


class Script:
    """A Lua script and its SHA1, for EVALSHA."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
