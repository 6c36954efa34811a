"""A lean HTTP/1.1 client for the gateway's hot path: one keep-alive pool per upstream origin.

Built on asyncio Protocols and httptools' llhttp response parser instead of aiohttp's client:
a request is one `transport.write` of bytes built once, a response body is a deque of the
batches `data_received` got (woken through one Future, only when the reader waits), and read
timeouts cost a timestamp per batch instead of a rescheduled timer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, parse_proxy_url
from python_socks.async_.asyncio import Proxy

HIGH_WATER = 1 << 20
"""Unread body bytes above which reading from the upstream pauses."""
LOW_WATER = HIGH_WATER // 4
"""Unread body bytes at or below which reading resumes."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PROXY_ERRORS = (OSError, ProxyError, ProxyConnectionError, ProxyTimeoutError)


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer properly."""


class ConnectFailed(UpstreamError):
    """No connection: DNS, refused, connect timeout, TLS handshake or proxy failure."""


class ReadTimeout(UpstreamError, TimeoutError):
    """No byte arrived for `read_timeout` seconds while waiting for headers or body."""


class TotalTimeout(UpstreamError, TimeoutError):
    """The request took longer than `total_timeout` seconds."""


class BodyBroken(UpstreamError):
    """The connection closed, or the response was malformed, before the response ended."""


class _Stale(BodyBroken):
    """A reused connection closed before any response byte: safe to retry on a fresh one."""


class UpstreamResponse:
    """A response whose status line and headers have arrived; the body streams in."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_eof",
        "_error",
        "_loop",
        "_unread",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        """Header names lower-cased; repeated headers joined with `, `."""
        self._conn: _Conn | None = conn
        self._loop = conn.loop
        self._chunks: deque[bytes] = deque()
        self._unread = 0
        self._eof = False
        """The body ended, or broke (then `_error` says how)."""
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The whole body."""
        parts: list[bytes] = []
        chunks = self._chunks
        while True:
            if chunks:
                parts.extend(chunks)
                chunks.clear()
                self._drained(0)
            if self._eof:
                break
            await self._wait()
        if self._error is not None:
            raise self._error
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, one item per network read, de-chunked."""
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while True:
            while chunks:
                data = chunks.popleft()
                self._drained(self._unread - len(data))
                yield data
            if self._eof:
                break
            await self._wait()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        """Give the connection back to the pool if the response ended cleanly, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish(self._eof and self._error is None and conn.keep_alive)

    def close(self) -> None:
        """Abort the connection at once; a pending read raises `BodyBroken`."""
        self._set_error(BodyBroken("response closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def _wait(self) -> asyncio.Future[None]:
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _push(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread > HIGH_WATER and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _drained(self, unread: int) -> None:
        self._unread = unread
        if unread <= LOW_WATER and self._conn is not None and self._conn.paused:
            self._conn.resume()

    def _finish(self) -> None:
        self._eof = True
        self._wake()

    def _set_error(self, error: UpstreamError) -> None:
        if not self._eof:
            self._error = error
            self._finish()


class _Conn(asyncio.Protocol):
    """One connection to the upstream, and the state of the exchange in progress on it."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.closed = False
        """Aborted here or lost; its pool slot is already free."""
        self.reused = False
        self.idle_since = 0.0
        self.paused = False
        self.keep_alive = False
        self.resp: UpstreamResponse | None = None
        self.fut: asyncio.Future[UpstreamResponse] | None = None
        self.head = False
        self.got_bytes = False
        self.informational = False
        self.eof_body = False
        """The body ends when the connection closes (no length, not chunked)."""
        self.complete = False
        self.parts: list[bytes] = []
        self.read_timeout: float | None = None
        self.last_read = 0.0
        self.read_timer: asyncio.TimerHandle | None = None
        self.total_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # nothing asked: an idle connection must stay silent
            self.abort()
            return
        self.got_bytes = True
        if self.read_timeout is not None:
            self.last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            if not self.complete:
                self.fail(BodyBroken("invalid HTTP response"))
                return
            self.keep_alive = False  # bytes after the response: never reuse
        parts = self.parts
        if parts:
            resp._push(parts[0] if len(parts) == 1 else b"".join(parts))
            parts.clear()
        if self.complete:
            self._stop_timers()
            resp._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_timers()
        self.pool._forget(self)
        fut, resp = self.fut, self.resp
        if fut is not None and not fut.done():
            stale = self.reused and not self.got_bytes
            fut.set_exception(_Stale() if stale else BodyBroken("connection closed by upstream"))
        elif resp is not None and not self.complete:
            if self.eof_body and exc is None:
                resp._finish()
            else:
                resp._set_error(BodyBroken("connection closed before the body ended"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.resp is not None
        if self.complete:
            return
        headers = self.resp.headers
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        resp, fut = self.resp, self.fut
        assert resp is not None and fut is not None
        if self.complete:
            self.keep_alive = False
            return
        status = self.parser.get_status_code()
        if status < 200:  # 1xx: an interim answer, the real one follows
            self.informational = True
            resp.headers.clear()
            return
        resp.status = status
        self.keep_alive = self.parser.should_keep_alive()
        if self.head:
            self.complete = True
            self.parser = HttpResponseParser(self)  # llhttp would wait for a body
        else:
            h = resp.headers
            self.eof_body = (
                status not in (204, 304)
                and "content-length" not in h
                and "chunked" not in h.get("transfer-encoding", "").lower()
            )
        if not fut.done():
            fut.set_result(resp)

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.parts.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        else:
            self.complete = True

    # used by the pool and the response

    def send(
        self,
        data: bytes,
        head: bool,
        read_timeout: float | None,
        deadline: float | None,
    ) -> asyncio.Future[UpstreamResponse]:
        """Write a request; the Future resolves when the response headers have arrived."""
        assert self.transport is not None
        self.resp = UpstreamResponse(self)
        fut = self.fut = self.loop.create_future()
        self.head = head
        self.got_bytes = self.complete = self.eof_body = self.informational = False
        if self.closed:  # lost while handed over from the pool
            fut.set_exception(_Stale())
            return fut
        self.transport.write(data)
        self.read_timeout = read_timeout
        if read_timeout is not None:
            self.last_read = now = self.loop.time()
            self.read_timer = self.loop.call_at(now + read_timeout, self._on_read_timer)
        if deadline is not None:
            self.total_timer = self.loop.call_at(deadline, self._on_total_timer)
        return fut

    def finish(self, reuse: bool) -> None:
        """The response is done with: keep the connection for the next request, or close it."""
        if not reuse or self.closed:
            self.abort()
            return
        self._stop_timers()
        if self.paused:
            self.resume()
        self.resp = self.fut = None
        self.reused = True
        self.idle_since = self.loop.time()
        self.pool._put(self)

    def abort(self) -> None:
        """Close the connection at once (the peer sees it closed) and free its pool slot."""
        if self.closed:
            return
        self.closed = True
        self._stop_timers()
        if self.transport is not None:
            self.transport.abort()
        self.pool._forget(self)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.last_read = self.loop.time()

    def fail(self, error: UpstreamError) -> None:
        """Abort the connection; the pending request or body read raises `error`."""
        self.abort()
        fut, resp = self.fut, self.resp
        if fut is not None and not fut.done():
            fut.set_exception(error)
        elif resp is not None and not self.complete:
            resp._set_error(error)

    def _on_read_timer(self) -> None:
        timeout = self.read_timeout
        assert timeout is not None
        now = self.loop.time()
        due = (now if self.paused else self.last_read) + timeout
        if due > now:
            self.read_timer = self.loop.call_at(due, self._on_read_timer)
        else:
            self.read_timer = None
            self.fail(ReadTimeout(f"no data from upstream for {timeout:g}s"))

    def _on_total_timer(self) -> None:
        self.total_timer = None
        self.fail(TotalTimeout("total timeout exceeded"))

    def _stop_timers(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        if self.total_timer is not None:
            self.total_timer.cancel()
            self.total_timer = None


class UpstreamPool:
    """Keep-alive connections to one origin (scheme, host, port), optionally through a proxy."""

    def __init__(
        self,
        base_url: str,
        *,
        proxy: str | None = None,
        headers: Mapping[str, str] = {},
        max_connections: int = 1000,
        connect_timeout: float = 10.0,
        keepalive_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self._ssl = ssl_context
        self._proxy_args = _proxy_args(proxy) if proxy else None
        self._proxy: Proxy | None = None
        self._default_names = frozenset(k.lower() for k in headers)
        self._defaults = dict(headers)
        self._fixed = self._encode_fixed(self._defaults)
        self._idle: deque[_Conn] = deque()
        self._conns: set[_Conn] = set()
        self._open = 0
        """Connections open or being opened: the slots in use."""
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None,
        total_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send a request to base URL + `path`; return once the status and headers are in.

        `headers` must not contain framing headers (Host, Content-Length, Connection).
        """
        loop = asyncio.get_running_loop()
        data = self._encode(method, path, body, headers)
        deadline = None if total_timeout is None else loop.time() + total_timeout
        conn = self._pop_idle(loop)
        retried = False
        while True:
            if conn is None:
                conn = await self._acquire(loop, deadline)
            fut = conn.send(data, method == "HEAD", read_timeout, deadline)
            try:
                return await fut
            except _Stale:
                if retried:
                    raise BodyBroken("connection closed by upstream") from None
                retried, conn = True, None
            except asyncio.CancelledError:
                fut.cancel()
                conn.abort()
                raise

    async def close(self) -> None:
        """Close every connection; the pool accepts no more requests."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("connection pool closed"))
        for conn in list(self._conns):
            conn.fail(BodyBroken("connection pool closed"))
        self._idle.clear()

    # request bytes

    def _encode_fixed(self, defaults: Mapping[str, str]) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != (443 if self.tls else 80):
            host = f"{host}:{self.port}"
        lines = [f"Host: {host}\r\n", *(f"{k}: {v}\r\n" for k, v in defaults.items())]
        text = "".join(lines)
        _check_lines(text, len(lines))
        return text.encode("latin-1")

    def _encode(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        fixed = self._fixed
        line = f"{method} {self.prefix}{path} HTTP/1.1\r\n"
        extra = ""
        if headers:
            extra = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
            if not self._default_names.isdisjoint(map(str.lower, headers)):
                fixed = self._fixed_without(headers)
            _check_lines(line + extra, len(headers) + 1)
        else:
            _check_lines(line, 1)
        if body is not None:
            extra += f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
        elif method in _BODY_METHODS:
            extra += "Content-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        else:
            extra += "Connection: keep-alive\r\n\r\n"
        parts = (line.encode("latin-1"), fixed, extra.encode("latin-1"))
        return b"".join((*parts, body)) if body else b"".join(parts)

    def _fixed_without(self, headers: Mapping[str, str]) -> bytes:
        """The fixed headers minus defaults that `headers` overrides."""
        names = {k.lower() for k in headers}
        return self._encode_fixed(
            {k: v for k, v in self._defaults.items() if k.lower() not in names}
        )

    # connections

    def _pop_idle(self, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        """The most recently used live idle connection, discarding dead and expired ones."""
        idle = self._idle
        if not idle:
            return None
        oldest = loop.time() - self.keepalive_timeout
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < oldest or conn.transport is None or conn.transport.is_closing():
                conn.abort()
                continue
            return conn
        return None

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> _Conn:
        """A connection from a free slot (waiting FIFO for one) within the connect timeout."""
        if self._closed:
            raise ConnectFailed("connection pool closed")
        timeout, total = self.connect_timeout, False
        if deadline is not None and deadline - loop.time() < timeout:
            timeout, total = max(deadline - loop.time(), 0.0), True
        try:
            async with asyncio.timeout(timeout):
                if self._open >= self.max_connections:
                    conn = await self._wait_slot(loop)
                    if conn is not None:
                        return conn
                else:
                    self._open += 1
                try:
                    conn = await self._connect(loop)
                except BaseException:
                    self._free_slot()
                    raise
        except TimeoutError:
            if total:
                raise TotalTimeout("total timeout while connecting") from None
            raise ConnectFailed(f"connect to {self._origin()} timed out") from None
        if self._closed:
            conn.abort()
            raise ConnectFailed("connection pool closed")
        return conn

    async def _wait_slot(self, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        """Wait for a released connection (returned) or a freed slot (None: now ours)."""
        waiter: asyncio.Future[_Conn | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()  # given to us just as we gave up: pass it on
                if handed is None:
                    self._free_slot()
                else:
                    self._put(handed)
            raise

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        ctx = self._ssl_context() if self.tls else None
        hostname = self.host if self.tls else None
        try:
            if self._proxy_args is None:
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, loop), self.host, self.port, ssl=ctx
                )
            else:
                sock = await self._get_proxy().connect(self.host, self.port, timeout=None)
                try:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, loop), sock=sock, ssl=ctx, server_hostname=hostname
                    )
                except BaseException:
                    sock.close()
                    raise
        except _PROXY_ERRORS as e:
            raise ConnectFailed(_connect_message(self._origin(), e)) from None
        self._conns.add(conn)
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _get_proxy(self) -> Proxy:
        if self._proxy is None:
            assert self._proxy_args is not None
            url, rdns = self._proxy_args
            self._proxy = Proxy.from_url(url, rdns=rdns)
        return self._proxy

    def _origin(self) -> str:
        return f"{self.host}:{self.port}"

    def _put(self, conn: _Conn) -> None:
        """Hand a reusable connection to the first waiter, or keep it idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        idle = self._idle
        idle.append(conn)
        oldest = conn.idle_since - self.keepalive_timeout
        while idle[0].idle_since < oldest or idle[0].closed:
            idle.popleft().abort()

    def _forget(self, conn: _Conn) -> None:
        """A connection closed: drop it and pass its slot on."""
        self._conns.discard(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        while self._waiters and not self._closed:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1


def _proxy_args(url: str) -> tuple[str, bool | None]:
    """python-socks' URL and `rdns` for a proxy URL; socks5h:// resolves names at the proxy."""
    rdns: bool | None = None
    if url.startswith("socks5://"):
        rdns = False
    elif url.startswith("socks5h://"):
        url, rdns = "socks5://" + url[len("socks5h://") :], True
    parse_proxy_url(url)  # raises ValueError for unsupported schemes
    return url, rdns


def _connect_message(origin: str, error: Exception) -> str:
    """A short reason, free of proxy credentials."""
    if isinstance(error, ProxyTimeoutError):
        return f"connect to {origin} through the proxy timed out"
    if isinstance(error, ProxyConnectionError):
        return f"could not reach the proxy for {origin}"
    if isinstance(error, ProxyError):
        return f"the proxy refused to connect to {origin}"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake with {origin} failed: {error.reason or type(error).__name__}"
    reason = type(error).__name__
    if isinstance(error, OSError):
        reason = os.strerror(error.errno) if error.errno else (error.strerror or reason)
    return f"connect to {origin} failed: {reason}"


def _check_lines(text: str, lines: int) -> None:
    """Refuse CR or LF inside a request line or header (header injection)."""
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("CR or LF in a request line or header")
