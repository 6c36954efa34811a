"""`Metrics`: what `render()` shows after recorded requests, in one process and across several."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmgate.accounting.ledger import LedgerEntry
from lmgate.observability import metrics as metrics_module
from lmgate.observability.metrics import Metrics
from lmgate.observability.multiprocess import (
    ENV,
    cleanup_multiprocess_dir,
    prepare_multiprocess_dir,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def entry(
    model: str = "m1",
    deployment: str | None = "up/m1",
    status: int = 200,
    *,
    latency_ms: float = 100.0,
    ttft_ms: float | None = None,
    error: str | None = None,
    prompt: int = 10,
    completion: int = 5,
    cost: float = 0.5,
) -> LedgerEntry:
    return LedgerEntry(
        request_id="r",
        created_at=datetime.now(UTC),
        user_id=None,
        team_id=None,
        key_id=None,
        model=model,
        deployment=deployment,
        status=status,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=cost,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        streamed=ttft_ms is not None,
        error_type=error,
    )


def parse(body: bytes) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_requests_tokens_cost_and_errors() -> None:
    m = Metrics()
    for _ in range(3):
        m.record(entry(), 90.0)
    m.record(entry(model="m2", deployment="other/x", prompt=7, completion=0, cost=0.0), 50.0)
    m.record(entry(status=504, error="timeout", prompt=0, completion=0, cost=0), None)
    m.record(entry(status=502, error="upstream_unreachable", deployment=None), None)
    m.record(entry(status=503, error="overloaded"), 10.0)
    m.record(entry(status=500, error="internal_error"), None)  # the gateway's fault
    m.record(entry(status=400, error="invalid_request"), 1.0)  # the client's
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    s = parse(body)
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="200") == 3
    assert value(s, "lmgate_requests_total", model="m2", provider="other", status="200") == 1
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="504") == 1
    assert value(s, "lmgate_requests_total", model="m1", provider="none", status="502") == 1
    assert (
        value(s, "lmgate_tokens_total", model="m1", direction="in") == 7 * 10
    )  # 8 requests, one without
    assert value(s, "lmgate_tokens_total", model="m1", direction="out") == 7 * 5
    assert value(s, "lmgate_tokens_total", model="m2", direction="in") == 7
    assert ("lmgate_tokens_total", frozenset({("model", "m2"), ("direction", "out")})) not in s
    assert value(s, "lmgate_cost_usd_total", model="m1") == pytest.approx(7 * 0.5)
    errors = {
        dict(labels)["type"]: v
        for (name, labels), v in s.items()
        if name == "lmgate_upstream_errors_total"
    }
    assert errors == {"timeout": 1, "upstream_unreachable": 1, "http_503": 1}
    assert value(s, "lmgate_upstream_errors_total", provider="none", type="upstream_unreachable")


def test_histograms() -> None:
    m = Metrics()
    m.record(entry(latency_ms=1000.0), 999.99)  # overhead 10 µs, exactly a bucket bound
    m.record(entry(latency_ms=30.0, ttft_ms=5.0), 20.0)  # overhead 10 ms
    m.record(entry(latency_ms=700_000.0), None)  # past the last bound; no upstream: all overhead
    s = parse(m.render()[0])
    duration = "lmgate_request_duration_seconds"
    assert value(s, f"{duration}_count", model="m1") == 3
    assert value(s, f"{duration}_sum", model="m1") == pytest.approx(701.03)
    assert value(s, f"{duration}_bucket", model="m1", le="0.025") == 0
    assert value(s, f"{duration}_bucket", model="m1", le="0.05") == 1
    assert value(s, f"{duration}_bucket", model="m1", le="1.0") == 2  # 1.0 <= 1.0
    assert value(s, f"{duration}_bucket", model="m1", le="600.0") == 2
    assert value(s, f"{duration}_bucket", model="m1", le="+Inf") == 3
    upstream = "lmgate_upstream_duration_seconds"
    assert value(s, f"{upstream}_count", model="m1", provider="up") == 2
    assert value(s, f"{upstream}_sum", model="m1", provider="up") == pytest.approx(1.01999)
    overhead = "lmgate_gateway_overhead_seconds"
    assert value(s, f"{overhead}_count") == 3
    assert value(s, f"{overhead}_bucket", le="1e-05") == 1
    assert value(s, f"{overhead}_bucket", le="0.01") == 2
    assert value(s, f"{overhead}_bucket", le="0.1") == 2
    assert value(s, f"{overhead}_bucket", le="+Inf") == 3
    ttft = "lmgate_time_to_first_token_seconds"
    assert value(s, f"{ttft}_count", model="m1") == 1
    assert value(s, f"{ttft}_bucket", model="m1", le="0.005") == 1


def test_renders_accumulate_and_gauges() -> None:
    m = Metrics()
    m.record(entry(), 1.0)
    m.render()
    m.record(entry(), 1.0)
    m.inflight(1)
    m.inflight(1)
    m.inflight(-1)
    m.rate_limited("m1", "rpm")
    m.rate_limited("m1", "rpm")
    m.rate_limited("m2", "tpm")
    m.cache(True, "m1")
    m.cache(False, "m1")
    m.cache(False, "m1")
    m.deployment_health("up/m1", True)
    m.deployment_health("down/m1", True)
    m.deployment_health("down/m1", False)
    s = parse(m.render()[0])
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="200") == 2
    assert value(s, "lmgate_requests_in_flight") == 1
    assert value(s, "lmgate_rate_limited_total", model="m1", limit="rpm") == 2
    assert value(s, "lmgate_rate_limited_total", model="m2", limit="tpm") == 1
    assert value(s, "lmgate_cache_requests_total", model="m1", result="hit") == 1
    assert value(s, "lmgate_cache_requests_total", model="m1", result="miss") == 2
    assert value(s, "lmgate_deployment_healthy", deployment="up/m1") == 1
    assert ("lmgate_deployment_healthy", frozenset({("deployment", "down/m1")})) in s
    assert value(s, "lmgate_deployment_healthy", deployment="down/m1") == 0


def test_model_labels_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "MAX_MODELS", 2)
    m = Metrics()
    for name in ("a", "b", "c", "d", "a"):
        m.record(entry(model=name), 1.0)
    s = parse(m.render()[0])
    per_model = {
        dict(labels)["model"]: v
        for (name, labels), v in s.items()
        if name == "lmgate_requests_total"
    }
    assert per_model == {"a": 2, "b": 1, "other": 2}


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.record(entry(), 1.0)
    assert value(parse(b.render()[0]), "lmgate_requests_total", model="m1", provider="up") == 0


def test_prepare_and_cleanup_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    path = prepare_multiprocess_dir()
    assert path is not None and path.is_dir() and os.environ[ENV] == str(path)
    cleanup_multiprocess_dir(path)
    assert not path.exists() and ENV not in os.environ
    monkeypatch.setenv(ENV, str(tmp_path))  # the operator's own directory: left alone
    assert prepare_multiprocess_dir() is None
    cleanup_multiprocess_dir(None)
    assert tmp_path.is_dir()


# -- multiprocess mode: separate interpreters sharing one PROMETHEUS_MULTIPROC_DIR ---------

_WORKER = """
import asyncio, sys
from datetime import UTC, datetime
from lmgate.accounting.ledger import LedgerEntry
from lmgate.observability.metrics import Metrics

def entry(model):
    return LedgerEntry("r", datetime.now(UTC), None, None, None, model, "up/" + model, 200,
                       prompt_tokens=10, completion_tokens=1, cost=0.25, latency_ms=200.0)
"""

_RECORD_AND_CLOSE = """
m = Metrics()
assert m.dir is not None
for _ in range(int(sys.argv[1])):
    m.record(entry("m1"), 150.0)
m.inflight(5)
m.close()
"""

_STAY_ALIVE = """
async def main():
    m = Metrics(flush_interval=0.05)
    for _ in range(4):
        m.record(entry("m2"), 150.0)
    m.inflight(2)
    await asyncio.sleep(0.3)  # the timer flushes; no explicit flush
    print("ready", flush=True)
    sys.stdin.read()  # until the test lets go; then exits like a killed worker, no close()
asyncio.run(main())
"""

_RENDER = """
m = Metrics()
m.record(entry("m1"), 150.0)
sys.stdout.write(m.render()[0].decode())
"""


def run(code: str, env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_WORKER) + code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_multiprocess_sums_workers(tmp_path: Path) -> None:
    env = {**os.environ, ENV: str(tmp_path)}
    run(_RECORD_AND_CLOSE, env, "3")
    run(_RECORD_AND_CLOSE, env, "4")
    alive = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WORKER) + _STAY_ALIVE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert alive.stdout is not None and alive.stdout.readline().strip() == "ready"
        s = parse(run(_RENDER, env).encode())
        assert value(s, "lmgate_requests_total", model="m1", provider="up", status="200") == 8
        assert value(s, "lmgate_requests_total", model="m2", provider="up", status="200") == 4
        assert value(s, "lmgate_tokens_total", model="m1", direction="in") == 80
        assert value(s, "lmgate_cost_usd_total", model="m1") == pytest.approx(2.0)
        assert value(s, "lmgate_request_duration_seconds_count", model="m1") == 8
        assert value(s, "lmgate_request_duration_seconds_bucket", model="m1", le="0.1") == 0
        assert value(s, "lmgate_request_duration_seconds_bucket", model="m1", le="0.25") == 8
        assert value(s, "lmgate_gateway_overhead_seconds_count") == 3 + 4 + 4 + 1
        # closed workers' in-flight gauges are gone; the live one counts
        assert value(s, "lmgate_requests_in_flight") == 2
    finally:
        assert alive.stdin is not None
        alive.stdin.close()
        alive.wait(10)
    s = parse(run(_RENDER, env).encode())
    assert value(s, "lmgate_requests_in_flight") == 0  # the dead worker's gauge is reaped
    assert value(s, "lmgate_requests_total", model="m2", provider="up", status="200") == 4
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="200") == 9
