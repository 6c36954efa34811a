"""lmgate benchmark: throughput, latency, CPU per request, TTFT and memory, vs LiteLLM.

    .venv/bin/python bench/run.py [--quick] [--litellm] [--accounting] [--limits]
                                  [--workers N] [--gateway-cmd TEMPLATE]

Prints a Markdown report and writes bench/results/<timestamp>.{md,json}. See bench/README.md.
With --accounting, lmgate is measured twice against the same upstreams: routing only (no keys,
budgets or ledger), then with a key, a budget and the ledger on; the two are also measured in
alternation, both running at once, for the difference in CPU per request. With --limits, the
same pairing compares rate limits held in process with the same limits held in Redis.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import orjson

import gateways
import report
from gateways import Gateway, Running, read_ledger
from loadgen import CommandLog, run_ttft, run_wrk
from proctree import (
    Service,
    free_port,
    machine_busy_seconds,
    own_and_children_seconds,
    sample_tree,
    spawn,
    stop,
    wait_port,
)
from upstreams import nginx_conf

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_STUB = "{python} -m lmgate.testing.stub --host 127.0.0.1 --port {port} --chunk-delay 0.02"
PREFLIGHT_BODY = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
GATEWAY_CPUS = "0"
LOADGEN_CPUS = "1"


@dataclass(frozen=True)
class Plan:
    """How long and how much each measurement runs."""

    mode: str
    warmup_s: int
    measure_s: int
    concurrencies: tuple[int, ...]
    soak_requests: int
    soak_max_s: int
    litellm_soak_s: int
    ttft_rounds: dict[int, int]
    ttft_warmup: int
    ttft_max_s: float
    ttft_chunks: int
    workers: int
    api_key: str
    accounting: bool = False
    paired_rounds: int = 0
    limits: bool = False


@dataclass
class Bench:
    """Shared state of one benchmark session."""

    plan: Plan
    tmp: Path
    log: CommandLog
    nginx_port: int
    stub_port: int
    stub_ok: bool
    stub_cmd: str
    upstream_pids: list[int]
    sent: dict[str, int] = field(default_factory=dict)
    """Requests completed per URL (warm-ups, preflights and streams included)."""

    def count(self, url: str, n: int) -> None:
        """Add `n` completed requests to `url`'s total."""
        self.sent[url] = self.sent.get(url, 0) + n


def make_plan(args: argparse.Namespace) -> Plan:
    """Durations and counts for --quick or the full run, with overrides applied."""
    quick = args.quick
    return Plan(
        mode="quick" if quick else "full",
        warmup_s=1 if quick else 3,
        measure_s=args.duration or (3 if quick else 10),
        concurrencies=(1, 16, 64),
        soak_requests=args.soak_requests or (20_000 if quick else 200_000),
        soak_max_s=60 if quick else 600,
        litellm_soak_s=10 if quick else 60,
        ttft_rounds={1: 40, 32: 10} if quick else {1: 300, 32: 60},
        ttft_warmup=1 if quick else 3,
        ttft_max_s=10.0 if quick else 60.0,
        ttft_chunks=args.ttft_chunks,
        workers=args.workers,
        api_key=args.api_key,
        accounting=args.accounting,
        paired_rounds=args.paired_rounds or (2 if quick else 3),
        limits=args.limits,
    )


def progress(msg: str) -> None:
    """Progress on stderr, so stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def known_cpu(bench: Bench, pid: int | None) -> tuple[float, float, float]:
    """(gateway tree, everything this harness started, whole machine) CPU seconds so far."""
    gateway = sample_tree(pid).cpu_seconds if pid else 0.0
    ours = gateway + own_and_children_seconds()
    ours += sum(sample_tree(p).cpu_seconds for p in bench.upstream_pids)
    return gateway, ours, machine_busy_seconds()


def wrk(
    bench: Bench, url: str, concurrency: int, duration_s: int, key: str | None
) -> dict[str, Any]:
    """One wrk run, its completed requests counted against `url`."""
    result = run_wrk(bench.log, url, concurrency, duration_s, api_key=key or bench.plan.api_key)
    bench.count(url, result["requests"])
    return result


def wrk_measured(
    bench: Bench,
    url: str,
    concurrency: int,
    pid: int | None,
    duration_s: int,
    key: str | None = None,
) -> dict[str, Any]:
    """Warm up, then one measured wrk run bracketed by CPU samples.

    Besides the gateway's CPU per request, it records how much CPU processes not started
    by this harness used meanwhile (`foreign_cpu_pct`, % of one core): a noise indicator.
    """
    wrk(bench, url, concurrency, bench.plan.warmup_s, key)
    gw0, ours0, machine0 = known_cpu(bench, pid)
    result = wrk(bench, url, concurrency, duration_s, key)
    gw1, ours1, machine1 = known_cpu(bench, pid)
    if pid:
        result.update(cpu_fields(gw0, gw1, result))
    foreign = (machine1 - machine0) - (ours1 - ours0)
    result["foreign_cpu_pct"] = max(0.0, foreign) * 100 / max(result["duration_s"], 1e-9)
    progress(f"  c={concurrency}: {result['rps']:.0f} req/s, p50 {result['p50_ms']:.2f} ms")
    return result


def cpu_fields(before: float, after: float, result: dict[str, Any]) -> dict[str, float]:
    """Gateway CPU seconds spent and microseconds per completed request."""
    spent = after - before
    per = spent * 1e6 / result["requests"] if result["requests"] else float("nan")
    return {"cpu_s": round(spent, 3), "cpu_us_per_request": per}


def throughput(bench: Bench, run: Running, concurrencies: tuple[int, ...]) -> dict[str, Any]:
    """Requests/s, latency and CPU per request at each concurrency."""
    return {
        str(c): wrk_measured(bench, run.url, c, run.service.pid, bench.plan.measure_s, run.api_key)
        for c in concurrencies
    }


def ttft_once(bench: Bench, url: str, concurrency: int, key: str | None = None) -> dict[str, Any]:
    """One TTFT measurement (warm-up rounds included) with ttft.py on the client core."""
    plan = bench.plan
    res = run_ttft(
        bench.log,
        url,
        concurrency,
        plan.ttft_rounds[concurrency],
        warmup=plan.ttft_warmup,
        max_seconds=plan.ttft_max_s,
        api_key=key or plan.api_key,
        chunks=plan.ttft_chunks,
        cpus=LOADGEN_CPUS,
    )
    bench.count(url, int(res.get("samples") or 0) + plan.ttft_warmup * concurrency)
    progress(f"  ttft c={concurrency}: p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms")
    return res


def ttft_suite(bench: Bench, url: str, key: str | None = None) -> dict[str, Any]:
    """TTFT percentiles at each configured stream concurrency."""
    return {str(c): ttft_once(bench, url, c, key) for c in bench.plan.ttft_rounds}


def soak_runs(
    bench: Bench, url: str, target: int, max_s: int, rate: float, key: str | None = None
) -> dict[str, Any]:
    """wrk runs at concurrency 64 until `target` requests are done or `max_s` has passed.

    wrk is bounded by time only, so each run's length is estimated from the rate so far.
    """
    total: dict[str, Any] = {"requests": 0, "duration_s": 0.0, "error_total": 0, "runs": 0}
    deadline = time.monotonic() + max_s
    while total["requests"] < target and (left := deadline - time.monotonic()) >= 1:
        if total["duration_s"]:
            rate = total["requests"] / total["duration_s"]
        wanted = math.ceil((target - total["requests"]) / max(rate, 1.0))
        res = wrk(bench, url, 64, int(min(left, max(1, wanted))), key)
        for field_ in ("requests", "duration_s", "error_total"):
            total[field_] += res[field_]
        total["runs"] += 1
    total["rps"] = total["requests"] / total["duration_s"] if total["duration_s"] else 0.0
    return total


def soak(bench: Bench, run: Running, by_time: bool, rate: float) -> dict[str, Any]:
    """RSS of the gateway tree before and after a long run at concurrency 64."""
    plan = bench.plan
    wrk(bench, run.url, 64, plan.warmup_s, run.api_key)
    before = sample_tree(run.service.pid)
    if by_time:
        result = soak_runs(bench, run.url, 2**62, plan.litellm_soak_s, rate, run.api_key)
    else:
        result = soak_runs(bench, run.url, plan.soak_requests, plan.soak_max_s, rate, run.api_key)
    time.sleep(1.0)
    after = sample_tree(run.service.pid)
    result.update(cpu_fields(before.cpu_seconds, after.cpu_seconds, result))
    result.update(
        rss_before_mb=before.rss_bytes / 2**20,
        rss_after_mb=after.rss_bytes / 2**20,
        rss_growth_mb=(after.rss_bytes - before.rss_bytes) / 2**20,
        processes=len(after.pids),
        bounded_by="time" if by_time else "count",
    )
    progress(f"  soak: {result['requests']} requests, RSS {result['rss_growth_mb']:+.1f} MB")
    return result


def dig_rate(out: dict[str, Any]) -> float:
    """Requests/s at 64 concurrent from the throughput phase, or a guess."""
    try:
        return float(out["throughput"]["64"]["rps"])
    except (KeyError, TypeError, ValueError):
        return 1000.0


def guarded(name: str, out: dict[str, Any], fn: Callable[[], Any]) -> None:
    """Run one phase; store its result under `name`, or the error if it fails."""
    try:
        out[name] = fn()
    except Exception as exc:
        progress(f"  {name} failed: {exc}")
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc(file=sys.stderr)


@contextlib.contextmanager
def gateway_up(bench: Bench, gw: Gateway, workers: int, cpus: str) -> Iterator[Running]:
    """A started gateway, stopped on exit."""
    run = gateways.start(
        gw,
        bench.tmp,
        bench.log,
        workers=workers,
        cpus=cpus,
        nginx_port=bench.nginx_port,
        stub_port=bench.stub_port,
    )
    try:
        yield run
    finally:
        stop(run.service)


def preflight(bench: Bench, run: Running, stream: bool) -> None:
    """One real request (and one stream) must succeed, or the figures would be of errors."""
    url, api_key = run.url, run.api_key or bench.plan.api_key
    cases = [("bench-model", False), ("stream-model", True)] if stream else [("bench-model", False)]
    for model, streaming in cases:
        body = orjson.dumps({**PREFLIGHT_BODY, "model": model, "stream": streaming})
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"preflight {model}: HTTP {exc.code} {exc.read()[:300]!r}") from None
        marker = b"data:" if streaming else b'"choices"'
        if marker not in text:
            raise RuntimeError(f"preflight {model}: unexpected answer {text[:300]!r}")
        bench.count(url, 1)


def ledger_check(bench: Bench, run: Running) -> dict[str, Any] | None:
    """After an accounting gateway stopped: its ledger against the requests it completed."""
    if run.database is None:
        return None
    ledger = read_ledger(run.database)
    ledger["requests_completed"] = bench.sent.get(run.url, 0)
    progress(
        f"  ledger: {ledger['rows']:,} records ({ledger['status_200']:,} with status 200) "
        f"for {ledger['requests_completed']:,} requests completed, "
        f"${ledger['cost_usd']:.4f} in all"
    )
    return ledger


def measure_gateway(bench: Bench, gw: Gateway) -> dict[str, Any]:
    """All single-worker figures for one gateway, then its multi-worker throughput."""
    out: dict[str, Any] = {"label": gw.label}
    progress(f"{gw.label}: starting (1 worker, cpus {GATEWAY_CPUS})")
    try:
        with gateway_up(bench, gw, 1, GATEWAY_CPUS) as run:
            preflight(bench, run, bench.stub_ok)
            out["rss_idle_mb"] = sample_tree(run.service.pid).rss_bytes / 2**20
            guarded("throughput", out, lambda: throughput(bench, run, bench.plan.concurrencies))
            if bench.stub_ok:
                guarded("ttft", out, lambda: ttft_suite(bench, run.url, run.api_key))
            rate = dig_rate(out)
            guarded("soak", out, lambda: soak(bench, run, gw.name == "litellm", rate))
        if run.database is not None:
            guarded("ledger", out, lambda: ledger_check(bench, run))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        progress(f"{gw.label} failed: {exc}")
        return out
    if bench.plan.workers > 1 and gw.name.startswith("lmgate"):
        guarded("workers", out, lambda: scaling(bench, gw))
    return out


def scaling(bench: Bench, gw: Gateway) -> dict[str, Any]:
    """Throughput with N workers, the gateway allowed on the first N cores."""
    n = bench.plan.workers
    cpus = ",".join(str(i) for i in range(min(n, os.cpu_count() or 1)))
    progress(f"{gw.label}: starting ({n} workers, cpus {cpus})")
    with gateway_up(bench, gw, n, cpus) as run:
        preflight(bench, run, stream=False)
        res = throughput(bench, run, tuple(c for c in bench.plan.concurrencies if c > 1))
    return {"workers": n, "cpus": cpus, "throughput": res}


def paired(bench: Bench, base: Gateway, acct: Gateway) -> dict[str, Any]:
    """Both gateways up at once on the gateway core, measured in alternation.

    At each concurrency, `paired_rounds` rounds of one measured wrk run per gateway (the
    order flips every round), so that slow drifts and other people's load hit both alike.
    The difference is the median over rounds of (accounting - routing only).
    """
    plan = bench.plan
    progress(f"paired runs: {base.label} and {acct.label}, {plan.paired_rounds} rounds each")
    out: dict[str, Any] = {"rounds": plan.paired_rounds, "by_concurrency": {}}
    with (
        gateway_up(bench, base, 1, GATEWAY_CPUS) as a,
        gateway_up(bench, acct, 1, GATEWAY_CPUS) as b,
    ):
        for run in (a, b):
            preflight(bench, run, stream=False)
        for c in plan.concurrencies:
            runs: dict[str, list[dict[str, Any]]] = {base.name: [], acct.name: []}
            for r in range(plan.paired_rounds):
                order = [(base, a), (acct, b)] if r % 2 == 0 else [(acct, b), (base, a)]
                for gw, run in order:
                    progress(f"  {gw.name} round {r + 1}:")
                    runs[gw.name].append(
                        wrk_measured(
                            bench, run.url, c, run.service.pid, plan.measure_s, run.api_key
                        )
                    )
            out["by_concurrency"][str(c)] = summarise_pairs(runs[base.name], runs[acct.name])
    out["ledger"] = ledger_check(bench, b)
    return out


def summarise_pairs(base: list[dict[str, Any]], acct: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of CPU per request and requests/s for each side, and of the paired differences."""

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return median(float(r[key]) for r in runs)

    cpu_diffs = [
        y["cpu_us_per_request"] - x["cpu_us_per_request"] for x, y in zip(base, acct, strict=True)
    ]
    return {
        "base_cpu_us": med(base, "cpu_us_per_request"),
        "acct_cpu_us": med(acct, "cpu_us_per_request"),
        "cpu_us_diff": median(cpu_diffs),
        "cpu_us_diffs": cpu_diffs,
        "base_rps": med(base, "rps"),
        "acct_rps": med(acct, "rps"),
        "base_p50_ms": med(base, "p50_ms"),
        "acct_p50_ms": med(acct, "p50_ms"),
        "errors": sum(int(r["error_total"]) for r in [*base, *acct]),
        "foreign_cpu_pct_max": max(float(r["foreign_cpu_pct"]) for r in [*base, *acct]),
        "runs": {"base": base, "acct": acct},
    }


def direct(bench: Bench) -> dict[str, Any]:
    """The upstreams without a gateway: nginx via wrk, the stub via ttft.py."""
    out: dict[str, Any] = {}
    url = f"http://127.0.0.1:{bench.nginx_port}"
    progress("direct to nginx")
    guarded(
        "throughput",
        out,
        lambda: {str(c): wrk_measured(bench, url, c, None, bench.plan.measure_s) for c in (1, 64)},
    )
    if bench.stub_ok:
        progress("direct to the SSE stub")
        guarded("ttft", out, lambda: ttft_suite(bench, f"http://127.0.0.1:{bench.stub_port}"))
    guarded("cross_core", out, lambda: cross_core(bench))
    return out


def cross_core(bench: Bench) -> dict[str, Any]:
    """Reference: upstreams on the gateway's core, client on core 1, no gateway.

    Measures what merely crossing cores costs on this machine (on a VM, waking an idle
    vCPU can take far longer than the gateway's own work).
    """
    progress(f"cross-core reference: upstreams on core {GATEWAY_CPUS}, no gateway")
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        nginx, port = start_nginx(bench.tmp, bench.log, "nginx-cross", GATEWAY_CPUS)
        stack.callback(stop, nginx)
        bench.upstream_pids.append(nginx.pid)
        stack.callback(bench.upstream_pids.remove, nginx.pid)
        out["throughput"] = {
            "1": wrk_measured(bench, f"http://127.0.0.1:{port}", 1, None, bench.plan.measure_s)
        }
        if bench.stub_ok:
            stub, sport = start_stub(bench.tmp, bench.log, bench.stub_cmd, "stub-x", GATEWAY_CPUS)
            if stub:
                stack.callback(stop, stub)
                out["ttft"] = {"1": ttft_once(bench, f"http://127.0.0.1:{sport}", 1)}
    return out


def start_nginx(tmp: Path, log: CommandLog, name: str, cpus: str) -> tuple[Service, int]:
    """A fixed-answer nginx upstream pinned to `cpus`."""
    port = free_port()
    conf = nginx_conf(tmp / name, port)
    svc = spawn(name, ["nginx", "-c", str(conf), "-p", str(tmp / name)], cpus, tmp)
    log.add(svc.cmd)
    wait_port(svc, port, 20)
    return svc, port


def start_stub(
    tmp: Path, log: CommandLog, template: str, name: str, cpus: str
) -> tuple[Service | None, int]:
    """The paced SSE stub; (None, port) with a warning if it cannot start."""
    port = free_port()
    fields = {"python": shlex.quote(sys.executable), "port": port, "host": "127.0.0.1"}
    cmd = shlex.split(template.format(**fields))
    svc = spawn(name, cmd, cpus, tmp, cwd=BENCH_DIR.parent)
    log.add(svc.cmd)
    try:
        wait_port(svc, port, 30)
    except (RuntimeError, TimeoutError) as exc:
        progress(f"SSE stub unavailable, TTFT skipped: {exc}")
        stop(svc)
        return None, port
    return svc, port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs, ~1 minute in all")
    p.add_argument("--litellm", action="store_true", help="also measure LiteLLM's proxy")
    p.add_argument("--litellm-version", default="1.106.2")
    p.add_argument(
        "--accounting",
        action="store_true",
        help="measure lmgate twice: routing only, then with a key, a budget and the ledger",
    )
    p.add_argument(
        "--limits",
        action="store_true",
        help="compare rate limits held in process with the same limits in Redis (paired)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis for --limits (env BENCH_REDIS_URL)",
    )
    p.add_argument(
        "--paired-rounds",
        type=int,
        help="with --accounting or --limits: alternating rounds per concurrency "
        "(default 3, quick 2)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="workers for the scaling run (default 2; 1 skips it)",
    )
    p.add_argument(
        "--gateway-cmd",
        help="command template for the gateway; placeholders {python} {host} {port} "
        "{config} {workers} (default: lmgate serve ...)",
    )
    p.add_argument("--stub-cmd", default=DEFAULT_STUB, help="SSE stub command template")
    p.add_argument(
        "--ttft-chunks",
        type=int,
        default=4,
        help="content chunks per TTFT stream (max_tokens; 20 ms apart; default 4)",
    )
    p.add_argument("--duration", type=int, help="seconds per measured wrk run")
    p.add_argument("--soak-requests", type=int, help="requests in the RSS run")
    p.add_argument(
        "--api-key",
        default=os.environ.get("BENCH_API_KEY", "sk-bench"),
        help="bearer key sent to the gateway (env BENCH_API_KEY)",
    )
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return p.parse_args(argv)


def check_tools() -> None:
    """Fail early if wrk, nginx or taskset is missing."""
    missing = [t for t in ("wrk", "nginx", "taskset") if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"missing tools: {', '.join(missing)} (apt-get install wrk nginx-light util-linux)"
        )


def run_all(args: argparse.Namespace, plan: Plan, tmp: Path, log: CommandLog) -> dict[str, Any]:
    """Start the upstreams, measure direct and each gateway, stop everything."""
    targets = [gateways.lmgate(args.gateway_cmd)]
    if args.accounting:
        targets.append(gateways.lmgate_accounting(args.gateway_cmd))
    if args.litellm:
        gateways.ensure_litellm(args.litellm_version, log)
        targets.append(gateways.litellm(args.litellm_version, args.api_key))
    with contextlib.ExitStack() as stack:
        nginx, nginx_port = start_nginx(tmp, log, "nginx", LOADGEN_CPUS)
        stack.callback(stop, nginx)
        stub, stub_port = start_stub(tmp, log, args.stub_cmd, "stub", LOADGEN_CPUS)
        if stub:
            stack.callback(stop, stub)
        pids = [nginx.pid] + ([stub.pid] if stub else [])
        bench = Bench(plan, tmp, log, nginx_port, stub_port, stub is not None, args.stub_cmd, pids)
        results: dict[str, Any] = {"direct": direct(bench), "gateways": {}}
        for gw in targets:
            results["gateways"][gw.name] = measure_gateway(bench, gw)
        if args.accounting:
            guarded("accounting", results, lambda: paired(bench, targets[0], targets[1]))
        if args.limits:
            local = gateways.lmgate_limits(args.gateway_cmd, None)
            shared = gateways.lmgate_limits(args.gateway_cmd, args.redis_url)
            guarded("limits", results, lambda: paired(bench, local, shared))
        return results


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the report."""
    args = parse_args(argv)
    check_tools()
    plan = make_plan(args)
    log = CommandLog()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="lmgate-bench-"))
    started = time.monotonic()
    machine = report.machine_info()
    try:
        results = run_all(args, plan, tmp, log)
    finally:
        if args.keep_tmp:
            progress(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    doc = {
        "timestamp": stamp,
        "argv": [sys.executable, *sys.argv],
        "elapsed_s": round(time.monotonic() - started, 1),
        "machine": machine,
        "plan": asdict(plan),
        "results": results,
        "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "commands": log.commands,
    }
    report.emit(doc, args.out)


if __name__ == "__main__":
    main()
