"""The gateway's Prometheus metrics, at well under a microsecond per update on the hot path.

prometheus-client's own objects cost about 0.4 µs per counter increment and 0.9 µs per
histogram observation here (1 and 2 µs in multiprocess mode, where each update writes a
memory-mapped file): some 6 µs (14 µs) for the dozen updates one request makes. So the hot
path only adds to plain numbers of this process (`_Series`, `_Hist`), and `flush()` moves
the sums into prometheus-client's metrics: before every scrape, and in multiprocess mode
also `flush_interval` seconds after a change, so that a scrape answered by another worker
sees this one's requests.

Not thread-safe: call everything from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from lmgate.accounting.ledger import LedgerEntry
from lmgate.observability.multiprocess import multiprocess_dir, process_exited, reap_dead_workers

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
    300.0, 600.0,
)  # fmt: skip
"""Seconds, for whole requests, upstream time and time to first token: 5 ms to 10 min."""
OVERHEAD_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
)  # fmt: skip
"""Seconds, for the gateway's own share of a request: 10 µs to 100 ms."""
UPSTREAM_FAILURES = frozenset(
    {"upstream_unreachable", "upstream_disconnected", "upstream_auth_failed", "timeout"}
)
"""`LedgerEntry.error_type` codes that count as upstream errors (besides 5xx answers)."""
_GATEWAY_FAILURES = frozenset({"internal_error", "not_ready"})
MAX_MODELS = 1000
"""Distinct `model` label values; later ones are counted as `other` (clients choose names)."""
NO_PROVIDER = "none"

M = TypeVar("M", bound=MetricWrapperBase)


class _Hist:
    """Observations not yet flushed: one count per bucket (the last is +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add_to(self, child: Histogram) -> None:
        """Add these observations to a prometheus-client histogram (a labelled child).

        prometheus-client can only observe one value at a time, so this writes its bucket
        and sum values directly; tests/test_observability_metrics.py checks the result.
        """
        for bucket, n in zip(child._buckets, self.counts, strict=True):
            if n:
                bucket.inc(n)
        if self.total:
            child._sum.inc(self.total)


class _Series:
    """Requests of one (model, deployment, status, error) since the last flush."""

    __slots__ = (
        "cost",
        "error",
        "latency",
        "model",
        "provider",
        "requests",
        "status",
        "tokens_in",
        "tokens_out",
        "ttft",
        "upstream",
    )

    def __init__(self, model: str, provider: str, status: int, error: str | None) -> None:
        self.model, self.provider, self.status, self.error = model, provider, status, error
        self.requests = self.tokens_in = self.tokens_out = 0
        self.cost = 0.0
        self.latency = _Hist(LATENCY_BUCKETS)
        self.upstream = _Hist(LATENCY_BUCKETS)
        self.ttft = _Hist(LATENCY_BUCKETS)

    def upstream_error(self) -> str | None:
        """The `type` label of an upstream failure, or None if the gateway or client failed."""
        if self.error in UPSTREAM_FAILURES:
            return self.error
        if self.status >= 500 and self.error not in _GATEWAY_FAILURES:
            return f"http_{self.status}"
        return None


class _Family(Generic[M]):
    """A labelled metric and its children, created once per label values."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def get(self, *labels: str) -> M:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """The gateway's metrics, with a private registry; one instance per process.

    In multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set before the process imported
    prometheus-client) the values live in that directory and `render()` sums every worker's.
    """

    def __init__(self, flush_interval: float = 1.0) -> None:
        self.flush_interval = flush_interval
        self.dir = multiprocess_dir()
        own: CollectorRegistry | None = None
        """Where the metrics register: nowhere in multiprocess mode, as their files are read."""
        if self.dir is None:
            own = self._exposed = CollectorRegistry()
        else:
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed, str(self.dir))
        model, provider = "model", "provider"
        self._requests = _Family(
            Counter(
                "lmgate_requests",
                "Requests metered, by model, provider and HTTP status.",
                [model, provider, "status"],
                registry=own,
            )
        )
        self._latency = _Family(
            Histogram(
                "lmgate_request_duration_seconds",
                "Time from the request's arrival to the last byte of its answer.",
                [model],
                buckets=LATENCY_BUCKETS,
                registry=own,
            )
        )
        self._upstream = _Family(
            Histogram(
                "lmgate_upstream_duration_seconds",
                "Time spent waiting on the upstream, from sending the request to its last byte.",
                [model, provider],
                buckets=LATENCY_BUCKETS,
                registry=own,
            )
        )
        self._overhead_metric = Histogram(
            "lmgate_gateway_overhead_seconds",
            "The gateway's own share of a request: its duration minus the upstream's.",
            buckets=OVERHEAD_BUCKETS,
            registry=own,
        )
        self._ttft = _Family(
            Histogram(
                "lmgate_time_to_first_token_seconds",
                "Time from a streamed request's arrival to its first chunk.",
                [model],
                buckets=LATENCY_BUCKETS,
                registry=own,
            )
        )
        self._tokens = _Family(
            Counter(
                "lmgate_tokens",
                "Tokens: direction=in for prompts, out for completions.",
                [model, "direction"],
                registry=own,
            )
        )
        self._cost = _Family(
            Counter("lmgate_cost_usd", "Cost in US dollars.", [model], registry=own)
        )
        self._upstream_errors = _Family(
            Counter(
                "lmgate_upstream_errors",
                "Failed upstream requests, by provider and type (a code, or http_<status>).",
                [provider, "type"],
                registry=own,
            )
        )
        self._limited_metric = _Family(
            Counter(
                "lmgate_rate_limited",
                "Requests refused by a rate limit, by model and limit.",
                [model, "limit"],
                registry=own,
            )
        )
        self._cache_metric = _Family(
            Counter(
                "lmgate_cache_requests",
                "Response cache lookups, by model and result (hit or miss).",
                [model, "result"],
                registry=own,
            )
        )
        self._inflight_metric = Gauge(
            "lmgate_requests_in_flight",
            "Requests being served now.",
            registry=own,
            multiprocess_mode="livesum",
        )
        self._health = _Family(
            Gauge(
                "lmgate_deployment_healthy",
                "1 if the deployment passes its health checks, 0 if it is out of rotation.",
                ["deployment"],
                registry=own,
                multiprocess_mode="livemin",
            )
        )
        self._series: dict[tuple[str, str | None, int, str | None], _Series] = {}
        self._overhead = _Hist(OVERHEAD_BUCKETS)
        self._limited: dict[tuple[str, str], int] = {}
        self._cache: dict[tuple[str, bool], int] = {}
        self._inflight = 0
        self._models: set[str] = set()
        self._scheduled = self.dir is None
        """A flush is due: in single-process mode always (render() flushes), so no timer."""

    # -- the hot path ---------------------------------------------------------------

    def record(self, entry: LedgerEntry, upstream_ms: float | None) -> None:
        """Count one finished request; `upstream_ms`: time spent waiting on the upstream.

        None when no upstream answered: the whole duration is then the gateway's overhead.
        """
        key = (entry.model, entry.deployment, entry.status, entry.error_type)
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = self._new_series(entry)
        s.requests += 1
        total = entry.latency_ms * 0.001
        s.latency.observe(total)
        if upstream_ms is None:
            self._overhead.observe(total)
        else:
            upstream = upstream_ms * 0.001
            s.upstream.observe(upstream)
            self._overhead.observe(total - upstream if total > upstream else 0.0)
        if entry.ttft_ms is not None:
            s.ttft.observe(entry.ttft_ms * 0.001)
        s.tokens_in += entry.prompt_tokens
        s.tokens_out += entry.completion_tokens
        s.cost += entry.cost
        if not self._scheduled:
            self._schedule()

    def inflight(self, delta: int) -> None:
        """A request started (+1) or ended (-1)."""
        self._inflight += delta
        if not self._scheduled:
            self._schedule()

    def rate_limited(self, model: str, limit: str) -> None:
        """A request refused by the rate limit `limit` (e.g. `rpm`, `tpm`)."""
        key = (model, limit)
        self._limited[key] = self._limited.get(key, 0) + 1
        if not self._scheduled:
            self._schedule()

    def cache(self, hit: bool, model: str) -> None:
        """A response cache lookup."""
        key = (model, hit)
        self._cache[key] = self._cache.get(key, 0) + 1
        if not self._scheduled:
            self._schedule()

    def deployment_health(self, label: str, healthy: bool) -> None:
        """A deployment entered (True) or left (False) rotation; rare, so written at once."""
        self._health.get(label).set(1.0 if healthy else 0.0)

    # -- export ---------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The body and content type of `GET /metrics` (all workers' sum when there are several)."""
        self.flush()
        if self.dir is not None:
            reap_dead_workers(self.dir)
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST

    def flush(self) -> None:
        """Move what the hot path counted into prometheus-client's metrics."""
        series, self._series = self._series, {}
        for s in series.values():
            self._flush_series(s)
        overhead, self._overhead = self._overhead, _Hist(OVERHEAD_BUCKETS)
        overhead.add_to(self._overhead_metric)
        limited, self._limited = self._limited, {}
        for (model, limit), n in limited.items():
            self._limited_metric.get(self._label(model), limit).inc(n)
        cache, self._cache = self._cache, {}
        for (model, hit), n in cache.items():
            self._cache_metric.get(self._label(model), "hit" if hit else "miss").inc(n)
        self._inflight_metric.set(self._inflight)

    def close(self) -> None:
        """At the process's exit: flush, and in multiprocess mode drop its live gauges."""
        self.flush()
        if self.dir is not None:
            process_exited(self.dir, os.getpid())

    # -- internals ------------------------------------------------------------------

    def _new_series(self, entry: LedgerEntry) -> _Series:
        provider = entry.deployment.partition("/")[0] if entry.deployment else NO_PROVIDER
        return _Series(entry.model, provider, entry.status, entry.error_type)

    def _label(self, model: str) -> str:
        """The `model` label value, bounded in number."""
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODELS:
            return "other"
        self._models.add(model)
        return model

    def _flush_series(self, s: _Series) -> None:
        model = self._label(s.model)
        self._requests.get(model, s.provider, str(s.status)).inc(s.requests)
        s.latency.add_to(self._latency.get(model))
        if any(s.upstream.counts):
            s.upstream.add_to(self._upstream.get(model, s.provider))
        if any(s.ttft.counts):
            s.ttft.add_to(self._ttft.get(model))
        if s.tokens_in:
            self._tokens.get(model, "in").inc(s.tokens_in)
        if s.tokens_out:
            self._tokens.get(model, "out").inc(s.tokens_out)
        if s.cost:
            self._cost.get(model).inc(s.cost)
        error = s.upstream_error()
        if error is not None:
            self._upstream_errors.get(s.provider, error).inc(s.requests)

    def _schedule(self) -> None:
        """Multiprocess mode: flush `flush_interval` seconds after the first change."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a script, a test): render() and close() flush
        self._scheduled = True
        loop.call_later(self.flush_interval, self._flush_later)

    def _flush_later(self) -> None:
        self._scheduled = False
        self.flush()
