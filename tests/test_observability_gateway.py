"""`GET /metrics` of a running gateway against the requests made to it, with 1 and 2 workers.

NOTE: these tests fail until the gateway integrates `lmgate.observability` (issue #4): the
configuration keys `observability: {metrics, request_log, log_format}` and
`routing: {health_check_interval, health_check_path}`, the `/metrics` route, and the calls
to `Metrics.record`/`inflight` and `HealthChecker`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import test_serve
from tests.harness import Servers, one_model
from tests.test_serve import free_port, serve, wait_ready

MSG = [{"role": "user", "content": "one two three"}]
processes = test_serve.processes  # the fixture that stops `lmgate serve` processes
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config(stub_url: str, tmp_path: Path, **routing: Any) -> dict[str, Any]:
    return {
        **one_model(stub_url),
        "auth": {"enabled": False},
        "accounting": {"enabled": True, "flush_interval": 0.1},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'lmgate.db'}"},
        "routing": {"retries": 0, **routing},
        "observability": {"metrics": True, "request_log": True, "log_format": "json"},
    }


def scrape(url: str) -> Samples:
    resp = httpx.get(f"{url}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(url: str, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until `check` holds (other workers flush their counts every second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def traffic(base_url: str) -> tuple[int, int]:
    """5 answers (2 streamed) and 2 upstream 503s; returns the prompt and completion tokens."""
    prompt = completion = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(5):
            body: dict[str, Any] = {"model": "m1", "messages": MSG}
            if i < 2:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
                text = client.post("/chat/completions", json=body).text
                usage = [line for line in text.splitlines() if '"usage":{' in line][-1]
                usage_obj = orjson.loads(usage.removeprefix("data: "))["usage"]
            else:
                usage_obj = client.post("/chat/completions", json=body).json()["usage"]
            prompt += usage_obj["prompt_tokens"]
            completion += usage_obj["completion_tokens"]
        for _ in range(2):
            failing = {"model": "m1", "messages": MSG, "stub": {"status": 503}}
            assert client.post("/chat/completions", json=failing).status_code == 503
    return prompt, completion


def check_counts(s: Samples, prompt: int, completion: int) -> None:
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="200") == 5
    assert value(s, "lmgate_requests_total", model="m1", provider="up", status="503") == 2
    assert value(s, "lmgate_upstream_errors_total", provider="up", type="http_503") == 2
    assert value(s, "lmgate_tokens_total", model="m1", direction="in") == prompt
    assert value(s, "lmgate_tokens_total", model="m1", direction="out") == completion
    assert value(s, "lmgate_request_duration_seconds_count", model="m1") == 7
    assert value(s, "lmgate_upstream_duration_seconds_count", model="m1", provider="up") == 7
    assert value(s, "lmgate_gateway_overhead_seconds_count") == 7
    assert value(s, "lmgate_time_to_first_token_seconds_count", model="m1") == 2
    assert value(s, "lmgate_requests_in_flight") == 0


def test_metrics_match_requests(servers: Servers, tmp_path: Path) -> None:
    stub = servers.stub()
    gw = servers.gateway(config(stub.url, tmp_path))
    prompt, completion = traffic(gw.base_url)
    check_counts(scrape(gw.url), prompt, completion)


def test_health_checks_in_metrics(servers: Servers, tmp_path: Path) -> None:
    stub = servers.stub()
    routing = {"health_check_interval": 0.1, "health_check_path": "/models"}
    gw = servers.gateway(config(stub.url, tmp_path, **routing))
    healthy = "lmgate_deployment_healthy"
    s = eventually(gw.url, lambda s: (healthy, frozenset({("deployment", "up/m1")})) in s)
    assert value(s, healthy, deployment="up/m1") == 1
    stub.options.fail_status = 503
    s = eventually(gw.url, lambda s: value(s, healthy, deployment="up/m1") == 0)
    assert value(s, healthy, deployment="up/m1") == 0
    stub.options.fail_status = None
    s = eventually(gw.url, lambda s: value(s, healthy, deployment="up/m1") == 1)
    assert value(s, healthy, deployment="up/m1") == 1


def test_metrics_sum_across_workers(servers: Servers, tmp_path: Path, processes: list[Any]) -> None:
    stub = servers.stub()
    path = tmp_path / "lmgate.yaml"
    path.write_text(yaml.safe_dump(config(stub.url, tmp_path)))
    port = free_port()
    proc = serve("--config", str(path), "--port", str(port), "--workers", "2")
    processes.append(proc)
    wait_ready(port, proc)
    url = f"http://127.0.0.1:{port}"
    prompt, completion = traffic(f"{url}/v1")
    labels = {"model": "m1", "provider": "up", "status": "200"}
    eventually(url, lambda s: value(s, "lmgate_requests_total", **labels) == 5)
    for _ in range(6):  # whichever worker answers the scrape, it sums both
        check_counts(scrape(url), prompt, completion)
