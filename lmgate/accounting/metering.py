"""Metering one request: reserve against budgets, read the usage, price it, write the ledger.

`Accounting.meter()` runs before forwarding; the `Meter` it returns watches the response
(as the relay's observer) and `Meter.finish()` settles the budgets and records the request
after the answer has been sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from lmgate.accounting.budgets import BudgetBook, Reservation
from lmgate.accounting.ledger import Ledger, LedgerEntry
from lmgate.accounting.prices import PriceBook
from lmgate.accounting.tokenizer import count_prompt, count_tokens, estimate_prompt_tokens
from lmgate.accounting.usage import (
    MessagesStreamUsage,
    StreamUsage,
    Usage,
    completion_text,
    inject_include_usage,
    splice_include_usage,
    usage_from_body,
    usage_from_messages_body,
    wants_usage,
)
from lmgate.api.errors import GatewayError
from lmgate.api.http import Headers
from lmgate.api.relay import Payload
from lmgate.auth.keys import Principal
from lmgate.routing.deployment import Deployment

_MAX_LOGGED_BODY = 1 << 20
_PENDING: set[asyncio.Future[None]] = set()
"""Requests whose usage is being counted in a thread (kept referenced until done)."""


async def drain(timeout: float = 10.0) -> None:
    """Wait for requests still being counted, so that shutdown records them too."""
    if _PENDING:
        await asyncio.wait(list(_PENDING), timeout=timeout)


def warm_tokenizer() -> None:
    """Load the tokenizer's vocabularies (about a second), so that estimates are quick."""
    count_tokens("warm up", "gpt-4o")
    count_tokens("warm up", "gpt-4")


class Sink(Protocol):
    """Where finished requests go: the ledger, metrics, the request log."""

    def record(
        self, entry: LedgerEntry, principal: Principal | None, upstream_ms: float | None
    ) -> None: ...


class LedgerSink:
    """The usage ledger as a sink."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def record(
        self, entry: LedgerEntry, principal: Principal | None, upstream_ms: float | None
    ) -> None:
        self.ledger.record(entry)


class Accounting:
    """Prices, budgets, and the sinks every finished request is recorded in."""

    def __init__(
        self,
        prices: PriceBook,
        budgets: BudgetBook | None,
        sinks: list[Sink],
        default_max_tokens: int,
    ) -> None:
        self.prices = prices
        self.budgets = budgets
        self.sinks = sinks
        self.default_max_tokens = default_max_tokens

    def emit(
        self, entry: LedgerEntry, principal: Principal | None, upstream_ms: float | None
    ) -> None:
        """Hand a finished request to every sink."""
        for sink in self.sinks:
            sink.record(entry, principal, upstream_ms)

    def record_hit(
        self,
        request_id: bytes,
        principal: Principal | None,
        model: str,
        body: bytes,
        bill: bool,
    ) -> tuple[float, int]:
        """Record an answer served from the cache: (its cost, its tokens)."""
        usage = usage_from_body(body) or Usage(0, 0)
        cost = self.prices.cost(model, None, usage)[0] if bill else 0.0
        p = principal
        self.emit(
            LedgerEntry(
                request_id=request_id.decode("ascii", "replace"),
                created_at=datetime.now(UTC),
                user_id=p.user_id if p else None,
                team_id=p.team_id if p else None,
                key_id=p.key_id if p else None,
                model=model,
                deployment=None,
                status=200,
                prompt_tokens=usage.prompt,
                completion_tokens=usage.completion,
                cached_tokens=usage.cached,
                reasoning_tokens=usage.reasoning,
                cost=cost,
                cache_hit=True,
            ),
            principal,
            None,
        )
        return cost, usage.prompt + usage.completion

    async def meter(
        self,
        request_id: bytes,
        principal: Principal | None,
        model: str,
        payload: Payload,
        upstream_model: str | None,
        api: str = "openai",
    ) -> Meter:
        """Reserve the request's maximum cost (429 if a budget is spent) and start metering.

        `api` is the format of the request and its answer: OpenAI's, or Anthropic's for a
        `/v1/messages` request passed to an Anthropic provider as is.
        """
        data = payload.data or {}
        stream: StreamUsage | MessagesStreamUsage | None = None
        if api == "anthropic":
            if data.get("stream") is True:
                stream = MessagesStreamUsage()
        elif data.get("stream") is True:
            strip = not wants_usage(data)
            if strip:
                _ask_for_usage(payload)
            stream = StreamUsage(strip=strip)
        meter = Meter(self, request_id, principal, model, payload, stream)
        if api == "anthropic":
            meter.read_usage = usage_from_messages_body
        if principal is not None and self.budgets is not None:
            try:
                meter.reservation = await self.budgets.reserve(
                    principal, self._max_cost(model, upstream_model, payload, data)
                )
            except GatewayError as refused:  # the refusal is a request too: it is recorded
                meter.finish(refused)
                raise
        return meter

    def _max_cost(
        self, model: str, upstream_model: str | None, payload: Payload, data: dict[str, Any]
    ) -> float:
        """The most this request can cost: the prompt (estimated from its size) + max tokens."""
        price = self.prices.price(model, upstream_model)
        if price is None:
            return 0.0
        max_out = data.get("max_completion_tokens") or data.get("max_tokens")
        if not isinstance(max_out, int) or max_out <= 0:
            max_out = self.default_max_tokens
        prompt = estimate_prompt_tokens(len(payload.raw or b""))
        return (prompt * price.input + max_out * price.output) / 1e6


class Meter:
    """The relay's observer for one request, and its ledger line when it ends."""

    __slots__ = (
        "_acc",
        "_body",
        "_chunks",
        "_deployment",
        "_error",
        "_model",
        "_payload",
        "_principal",
        "_request_id",
        "_start",
        "_status",
        "_stream",
        "_ttft",
        "_upstream_start",
        "_usage",
        "cost",
        "read_usage",
        "reservation",
        "tokens",
    )

    def __init__(
        self,
        acc: Accounting,
        request_id: bytes,
        principal: Principal | None,
        model: str,
        payload: Payload,
        stream: StreamUsage | MessagesStreamUsage | None,
    ) -> None:
        self._acc = acc
        self._request_id = request_id
        self._principal = principal
        self._model = model
        self._payload = payload
        self.reservation: Reservation | None = None
        self._stream = stream
        self._start = time.perf_counter()
        self._deployment: Deployment | None = None
        self._status = 0
        self._upstream_start: float | None = None
        self._error: GatewayError | None = None
        self._usage: Usage | None = None
        self._ttft: float | None = None
        self._body: bytes | None = None
        self._chunks: list[bytes] | None = (
            [] if principal is not None and principal.log_bodies else None
        )
        self.cost = 0.0
        self.tokens = 0
        """Prompt + completion tokens, once the request has finished."""
        self.read_usage: Callable[[bytes], Usage | None] = usage_from_body
        """The usage of a complete answer (Anthropic's format for native Messages answers)."""

    def attempt(self, dep: Deployment) -> None:
        self._deployment = dep
        self._upstream_start = time.perf_counter()

    def answered(self, dep: Deployment, status: int) -> None:
        self._deployment = dep
        self._status = status

    def failed(self, error: GatewayError) -> None:
        self._error = error

    def body(self, body: bytes) -> Headers | None:
        """Price a complete answer now, so that its cost travels in `x-lmgate-cost`."""
        self._body = body
        self._usage = self.read_usage(body) or self._estimate()
        self.cost, _ = self._acc.prices.cost(self._model, self._upstream_model(), self._usage)
        return [(b"x-lmgate-cost", f"{self.cost:.8f}".encode())]

    def chunk(self, chunk: bytes) -> bytes:
        if self._ttft is None:
            self._ttft = time.perf_counter()
        if self._chunks is not None and chunk:
            self._chunks.append(chunk)
        if self._stream is None:
            return chunk
        return self._stream.feed(chunk) if chunk else self._stream.flush()

    def finish(self, error: GatewayError | None) -> None:
        """Settle the budgets with the real cost and record the request.

        A stream that carried no usage is counted with the tokenizer in a worker thread,
        so that the event loop never waits for it.
        """
        end = time.perf_counter()
        error = error or self._error
        status = error.status if error is not None and not self._ttft else self._status
        if self._stream is not None and self._body is None:
            self._usage = self._stream.usage
            if self._usage is None and status < 400:
                task = asyncio.ensure_future(self._finish_estimated(end, error, status))
                _PENDING.add(task)
                task.add_done_callback(_PENDING.discard)
                return
        self._complete(end, error, status)

    async def _finish_estimated(self, end: float, error: GatewayError | None, status: int) -> None:
        self._usage = await asyncio.to_thread(self._estimate)
        self._complete(end, error, status)

    def _complete(self, end: float, error: GatewayError | None, status: int) -> None:
        if self._stream is not None and self._usage is not None and self._body is None:
            self.cost, _ = self._acc.prices.cost(self._model, self._upstream_model(), self._usage)
        if self._acc.budgets is not None:
            self._acc.budgets.settle(self.reservation, self.cost)
        u = self._usage or Usage(0, 0)
        self.tokens = u.prompt + u.completion
        p = self._principal
        upstream = self._upstream_start
        self._acc.emit(
            LedgerEntry(
                request_id=self._request_id.decode("ascii", "replace"),
                created_at=datetime.now(UTC),
                user_id=p.user_id if p else None,
                team_id=p.team_id if p else None,
                key_id=p.key_id if p else None,
                model=self._model,
                deployment=self._deployment.label if self._deployment else None,
                status=status,
                prompt_tokens=u.prompt,
                completion_tokens=u.completion,
                cached_tokens=u.cached,
                reasoning_tokens=u.reasoning,
                cost=self.cost,
                latency_ms=(end - self._start) * 1000,
                ttft_ms=(self._ttft - self._start) * 1000 if self._ttft else None,
                streamed=self._stream is not None,
                estimated=u.estimated,
                error_type=(error.code or error.type) if error is not None else None,
                bodies=self._bodies(),
            ),
            p,
            (end - upstream) * 1000 if upstream is not None else None,
        )

    def _upstream_model(self) -> str | None:
        return self._deployment.upstream_model if self._deployment else None

    def _estimate(self) -> Usage:
        """Token counts from the offline tokenizer, for upstreams that report none."""
        model = self._upstream_model() or self._model
        prompt = count_prompt(self._payload.data or {}, model)
        if self._body is not None:
            completion = count_tokens(completion_text(self._body), model)
        elif self._stream is not None:
            completion = self._stream.estimate_completion_tokens(model)
        else:
            completion = 0
        return Usage(prompt, completion, estimated=True)

    def _bodies(self) -> tuple[str, str] | None:
        if self._chunks is None:
            return None
        response = self._body if self._body is not None else b"".join(self._chunks)
        raw = self._payload.raw or b""
        return (
            raw[:_MAX_LOGGED_BODY].decode("utf-8", "replace"),
            response[:_MAX_LOGGED_BODY].decode("utf-8", "replace"),
        )


def _ask_for_usage(payload: Payload) -> None:
    """Make a stream request ask the upstream for usage, keeping the client's bytes if we can."""
    assert payload.data is not None
    inject_include_usage(payload.data)
    spliced = splice_include_usage(payload.raw or b"")
    if spliced is not None and not payload.dirty:
        payload.raw = spliced
    else:
        payload.dirty = True
