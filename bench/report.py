"""Machine facts, target checks and the Markdown/JSON report."""

from __future__ import annotations

import math
import operator
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson

REPO_DIR = Path(__file__).resolve().parent.parent
Figure = float | None


def _first_line(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    except (OSError, ValueError):
        pass
    return "unknown RAM"


def _lmgate_version() -> str:
    code = "import lmgate; print(lmgate.__version__)"
    return _first_line([sys.executable, "-c", code])


def _revision() -> str:
    """The checked-out commit, read from .git's files (uncommitted changes not shown)."""
    git = REPO_DIR / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict[str, Any]:
    """Facts that make figures comparable between machines."""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total": _mem_total(),
        "kernel": platform.release(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": sys.version.split()[0],
        "lmgate": _lmgate_version(),
        "revision": _revision(),
        "wrk": _first_line(["wrk", "--version"]).split(" [")[0],
        "nginx": _first_line(["nginx", "-v"]),
    }


def dig(doc: Any, *path: str) -> Any:
    """doc[p0][p1]...; None if any step is missing."""
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def num(value: Any) -> Figure:
    """A finite float, or None."""
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def diff(a: Any, b: Any) -> Figure:
    """a - b when both are numbers."""
    x, y = num(a), num(b)
    return None if x is None or y is None else x - y


def fmt(value: Figure, spec: str, suffix: str = "") -> str:
    """Format a figure, or an em dash when it is missing."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def verdict(value: Figure, ok: Callable[[float], bool]) -> str:
    """✅ / ❌ for lmgate against a target, blank when not measured."""
    if value is None:
        return ""
    return "✅" if ok(value) else "❌"


def _latency(g: dict[str, Any], c: str) -> str:
    p50, p99 = num(dig(g, "throughput", c, "p50_ms")), num(dig(g, "throughput", c, "p99_ms"))
    return f"{fmt(p50, '.2f')} / {fmt(p99, '.2f')}"


def _ttft_added(g: dict[str, Any], direct: dict[str, Any], c: str) -> tuple[str, Figure]:
    p50 = diff(dig(g, "ttft", c, "p50_ms"), dig(direct, "ttft", c, "p50_ms"))
    p99 = diff(dig(g, "ttft", c, "p99_ms"), dig(direct, "ttft", c, "p99_ms"))
    return f"{fmt(p50, '+.2f')} (p99 {fmt(p99, '+.2f')})", p50


def _ttft_text(g: dict[str, Any], direct: dict[str, Any], c: str) -> str:
    return _ttft_added(g, direct, c)[0]


def _scaling(g: dict[str, Any]) -> tuple[str, Figure]:
    many = num(dig(g, "workers", "throughput", "64", "rps"))
    one = num(dig(g, "throughput", "64", "rps"))
    if many is None or one is None or one == 0:
        return "—", None
    n = dig(g, "workers", "workers")
    cpu = fmt(num(dig(g, "workers", "throughput", "64", "cpu_us_per_request")), ",.0f")
    return f"{many:,.0f} ({many / one:.2f}x of 1 worker; {n} workers, {cpu} µs/req)", many / one


def _errors(g: dict[str, Any]) -> str:
    runs = [*(g.get("throughput") or {}).values(), g.get("soak") or {}]
    total = sum(int(r.get("error_total") or 0) for r in runs if isinstance(r, dict))
    return f"{total:,}"


def _foreign(g: dict[str, Any]) -> str:
    runs = [
        *(g.get("throughput") or {}).values(),
        *(dig(g, "workers", "throughput") or {}).values(),
    ]
    values = [num(r.get("foreign_cpu_pct")) for r in runs if isinstance(r, dict)]
    found = [v for v in values if v is not None]
    return fmt(max(found), ".0f", "%") if found else "—"


def _rss(g: dict[str, Any]) -> tuple[str, str, Figure]:
    s = g.get("soak") or {}
    span = f"{fmt(num(s.get('rss_before_mb')), '.1f')} → {fmt(num(s.get('rss_after_mb')), '.1f')}"
    reqs = s.get("requests")
    span += f" ({reqs:,} req, {s.get('bounded_by')}-bounded)" if reqs else ""
    growth = num(s.get("rss_growth_mb"))
    return span, fmt(growth, "+.1f"), growth


def _rps(g: dict[str, Any], c: str) -> str:
    return fmt(num(dig(g, "throughput", c, "rps")), ",.0f")


def _cpu(g: dict[str, Any], c: str) -> str:
    return fmt(num(dig(g, "throughput", c, "cpu_us_per_request")), ",.0f")


def _added(g: dict[str, Any], direct: dict[str, Any]) -> Figure:
    return diff(dig(g, "throughput", "1", "p50_ms"), dig(direct, "throughput", "1", "p50_ms"))


def _beyond_cross(g: dict[str, Any], direct: dict[str, Any]) -> str:
    wrk = diff(
        dig(g, "throughput", "1", "p50_ms"), dig(direct, "cross_core", "throughput", "1", "p50_ms")
    )
    ttft = diff(dig(g, "ttft", "1", "p50_ms"), dig(direct, "cross_core", "ttft", "1", "p50_ms"))
    return f"{fmt(wrk, '+.2f')} / {fmt(ttft, '+.2f')}"


def _ratio(gws: dict[str, Any]) -> Figure:
    lm = num(dig(gws, "lmgate", "throughput", "64", "rps"))
    ll = num(dig(gws, "litellm", "throughput", "64", "rps"))
    return lm / ll if lm and ll else None


def gateway_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table; verdicts are for lmgate."""
    gws: dict[str, Any] = dig(doc, "results", "gateways") or {}
    direct: dict[str, Any] = dig(doc, "results", "direct") or {}
    names = list(gws)
    header = ["figure", *(gws[n].get("label", n) for n in names), "target", "lmgate"]
    rows: list[list[str]] = []

    def add(figure: str, cell: Callable[[dict[str, Any]], str], target: str, ok: str) -> None:
        rows.append([figure, *(cell(gws[n]) for n in names), target, ok])

    lm = gws.get("lmgate", {})
    for c in ("1", "16", "64"):
        add(f"requests/s @{c}", partial(_rps, c=c), "", "")
    ratio = _ratio(gws)
    ratio_text = fmt(ratio, ".1f", "x")
    add(
        "lmgate ÷ LiteLLM requests/s @64",
        lambda g: ratio_text if g is lm else "",
        "≥ 30x",
        verdict(ratio, lambda r: r >= 30),
    )
    for c in ("1", "16", "64"):
        add(f"latency p50 / p99 ms @{c}", partial(_latency, c=c), "", "")
    for c in ("1", "16", "64"):
        cpu = num(dig(lm, "throughput", c, "cpu_us_per_request"))
        add(
            f"gateway CPU µs/request @{c}",
            partial(_cpu, c=c),
            "≤ 500",
            verdict(cpu, lambda v: v <= 500),
        )
    add(
        "added p50 ms vs direct @1",
        lambda g: fmt(_added(g, direct), "+.2f"),
        "≤ +0.6",
        verdict(_added(lm, direct), lambda v: v <= 0.6),
    )
    for c, limit in (("1", 1.0), ("32", 5.0)):
        value = _ttft_added(lm, direct, c)[1]
        add(
            f"TTFT added ms @{c} streams",
            partial(_ttft_text, direct=direct, c=c),
            f"≤ {limit:g}",
            verdict(value, partial(operator.ge, limit)),
        )
    add(
        "p50 ms @1 beyond the cross-core reference: wrk / TTFT",
        partial(_beyond_cross, direct=direct),
        "info",
        "",
    )
    add("RSS MB before → after long run", lambda g: _rss(g)[0], "", "")
    add("RSS growth MB", lambda g: _rss(g)[1], "< 10", verdict(_rss(lm)[2], lambda v: v < 10))
    add(
        "requests/s @64, N workers",
        lambda g: _scaling(g)[0],
        "scales (≥ 1.2x)",
        verdict(_scaling(lm)[1], lambda v: v >= 1.2),
    )
    add("failed requests (all wrk runs)", _errors, "0", "")
    add("CPU of other processes during runs, max % of a core", _foreign, "≈ 0", "")
    return header, rows


def _cells(t: dict[str, Any], first: str) -> list[str]:
    return [
        first,
        fmt(num(t.get("p50_ms")), ".3f"),
        fmt(num(t.get("p99_ms")), ".3f"),
        fmt(num(t.get("foreign_cpu_pct")), ".0f", "%"),
    ]


def direct_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The upstreams measured without a gateway."""
    d: dict[str, Any] = dig(doc, "results", "direct") or {}
    wrk_runs = [(f"nginx @{c} (wrk)", dig(d, "throughput", c)) for c in ("1", "64")] + [
        ("nginx @1, nginx on core 0 (cross-core)", dig(d, "cross_core", "throughput", "1"))
    ]
    ttft_runs = [(f"SSE stub TTFT @{c} streams", dig(d, "ttft", c)) for c in ("1", "32")] + [
        ("SSE stub TTFT @1, stub on core 0 (cross-core)", dig(d, "cross_core", "ttft", "1"))
    ]
    rows = [
        [name, *_cells(t or {}, fmt(num((t or {}).get("rps")), ",.0f"))] for name, t in wrk_runs
    ]
    rows += [
        [name, *_cells(t or {}, f"{(t or {}).get('samples', '—')} samples")]
        for name, t in ttft_runs
    ]
    header = ["upstream, no gateway", "requests/s (or samples)", "p50 ms", "p99 ms", "others' CPU"]
    return header, rows


ACCT_TARGET_US = 60.0
LIMITS_TARGET_US = 100.0
"""Most CPU per request that keys, a budget and the ledger may add."""


def _ledger_text(ledger: Any) -> str:
    if not isinstance(ledger, dict) or "rows" not in ledger:
        return "—"
    statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(ledger.get("statuses", {}).items()))
    return (
        f"{ledger['rows']:,} records ({statuses}) for {ledger.get('requests_completed', 0):,} "
        f"requests completed; ${ledger.get('cost_usd', 0.0):.4f}"
    )


def paired_rows(pairs: dict[str, Any], target_us: float) -> list[list[str]]:
    """Requests/s, CPU µs/request (against `target_us` extra) and p50 of paired runs."""
    rows: list[list[str]] = []
    rounds = pairs.get("rounds", "?")
    for c in ("1", "16", "64"):
        p = dig(pairs, "by_concurrency", c) or {}
        b, a = num(p.get("base_rps")), num(p.get("acct_rps"))
        change = fmt(100 * (a / b - 1), "+.1f", " %") if a is not None and b else "—"
        rows.append([f"requests/s @{c} (paired, median of {rounds})", fmt(b, ",.0f"),
                     fmt(a, ",.0f"), change, "", ""])  # fmt: skip
    for c in ("1", "16", "64"):
        p = dig(pairs, "by_concurrency", c) or {}
        d = num(p.get("cpu_us_diff"))
        spread = ", ".join(fmt(num(x), "+.0f") for x in p.get("cpu_us_diffs", []))
        rows.append([
            f"gateway CPU µs/request @{c} (paired)",
            fmt(num(p.get("base_cpu_us")), ",.0f"),
            fmt(num(p.get("acct_cpu_us")), ",.0f"),
            f"{fmt(d, '+.0f')} (rounds: {spread})" if spread else fmt(d, "+.0f"),
            f"≤ +{target_us:g}",
            verdict(d, lambda v: v <= target_us),
        ])  # fmt: skip
    for c in ("1", "64"):
        p = dig(pairs, "by_concurrency", c) or {}
        b, a = num(p.get("base_p50_ms")), num(p.get("acct_p50_ms"))
        rows.append([f"latency p50 ms @{c} (paired)", fmt(b, ".2f"), fmt(a, ".2f"),
                     fmt(diff(a, b), "+.2f"), "", ""])  # fmt: skip
    return rows


def _paired_health(pairs: dict[str, Any]) -> list[list[str]]:
    runs = [dig(pairs, "by_concurrency", c) or {} for c in ("1", "16", "64")]
    errors = sum(int(r.get("errors") or 0) for r in runs)
    foreign = [num(r.get("foreign_cpu_pct_max")) for r in runs]
    seen = [f for f in foreign if f is not None]
    return [
        ["failed requests (paired runs)", "", f"{errors:,}", "", "0", ""],
        ["CPU of other processes during paired runs, max % of a core", "",
         fmt(max(seen), ".0f", "%") if seen else "—", "", "≈ 0", ""],
    ]  # fmt: skip


def accounting_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Routing only against keys + budget + ledger: paired runs first, then the single runs."""
    gws: dict[str, Any] = dig(doc, "results", "gateways") or {}
    acc: dict[str, Any] = dig(doc, "results", "accounting") or {}
    base, acct = gws.get("lmgate", {}), gws.get("lmgate-acct", {})
    direct: dict[str, Any] = dig(doc, "results", "direct") or {}
    header = ["figure", "routing only", "keys + budget + ledger", "difference", "target", ""]
    rows = paired_rows(acc, ACCT_TARGET_US)
    for c in ("1", "16", "64"):
        b, a = num(dig(base, "throughput", c, "rps")), num(dig(acct, "throughput", c, "rps"))
        cb = num(dig(base, "throughput", c, "cpu_us_per_request"))
        ca = num(dig(acct, "throughput", c, "cpu_us_per_request"))
        rows.append([f"requests/s, CPU µs/request @{c} (separate runs)",
                     f"{fmt(b, ',.0f')}, {fmt(cb, ',.0f')}", f"{fmt(a, ',.0f')}, {fmt(ca, ',.0f')}",
                     f"CPU {fmt(diff(ca, cb), '+.0f')}", "", ""])  # fmt: skip
    for c in ("1", "32"):
        b, a = _ttft_added(base, direct, c)[1], _ttft_added(acct, direct, c)[1]
        rows.append([f"TTFT added p50 ms @{c} streams", fmt(b, "+.2f"), fmt(a, "+.2f"),
                     fmt(diff(a, b), "+.2f"), "", ""])  # fmt: skip
    rb, ra = _rss(base), _rss(acct)
    rows.append(["RSS growth MB over the long run", rb[1], ra[1], "", "< 10",
                 verdict(ra[2], lambda v: v < 10)])  # fmt: skip
    rows.append(["requests/s @64, N workers", _scaling(base)[0], _scaling(acct)[0], "", "", ""])
    rows.append(["ledger after the separate runs", "", _ledger_text(acct.get("ledger")), "",
                 "", ""])  # fmt: skip
    rows.append(["ledger after the paired runs", "", _ledger_text(acc.get("ledger")), "", "", ""])
    return header, rows + _paired_health(acc)


def accounting_section(doc: dict[str, Any]) -> str:
    """The --accounting comparison, or nothing."""
    if not dig(doc, "plan", "accounting"):
        return ""
    return "\n".join([
        "## Keys, budgets and the ledger",
        "",
        "Routing only (`auth.enabled: false`, `accounting.enabled: false`) against a key sent "
        "on every request, a budget on that key, prices for both models and the ledger in "
        "SQLite (`flush_interval` 1 s). Paired: both gateways running at once on core 0, "
        "measured in alternation.",
        "",
        table(*accounting_rows(doc)),
        "",
    ])  # fmt: skip


def limits_section(doc: dict[str, Any]) -> str:
    """The --limits comparison, or nothing."""
    if not dig(doc, "plan", "limits"):
        return ""
    pairs: dict[str, Any] = dig(doc, "results", "limits") or {}
    header = ["figure", "limits in process", "limits in Redis", "difference", "target", ""]
    rows = paired_rows(pairs, LIMITS_TARGET_US) + _paired_health(pairs)
    return "\n".join([
        "## Rate limits in Redis",
        "",
        "RPM, TPM and in-flight limits on both models (never reached), no keys: held in process, "
        "then the same limits in Redis (`limits.redis_url`: one Lua script per request, its "
        "settlement pipelined afterwards). Paired: both gateways running at once on core 0, "
        "measured in alternation.",
        "",
        table(header, rows),
        "",
    ])  # fmt: skip


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def errors_section(doc: dict[str, Any]) -> str:
    """Phases that failed, so a missing figure is explained."""
    found = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("error"), str):
                found.append(f"- `{path}`: {node['error'].splitlines()[0]}")
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)

    walk(doc.get("results"), "")
    return "\n".join(["## Failed phases", "", *found]) if found else ""


def markdown(doc: dict[str, Any]) -> str:
    """The whole report."""
    m = doc["machine"]
    plan = doc["plan"]
    parts = [
        f"# lmgate benchmark {doc['timestamp']} ({plan['mode']} run, {doc['elapsed_s']} s)",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['mem_total']}, Linux {m['kernel']}, "
        f"Python {m['python']}, lmgate {m['lmgate']} (commit {m.get('revision', '?')}, "
        f"plus any uncommitted changes), {m['wrk']}, {m['nginx']}.",
        f"Load average at start {m['loadavg_start']}, at end {doc.get('loadavg_end', '?')} "
        "(anything else running on these cores skews the figures).",
        "Gateway pinned to core 0 (cores 0..N-1 with N workers); nginx, the SSE stub, wrk and "
        "ttft.py pinned to core 1.",
        "",
        table(*gateway_rows(doc)),
        "",
        table(*direct_rows(doc)),
        "",
        accounting_section(doc),
        limits_section(doc),
        errors_section(doc),
        "## Commands",
        "",
        "```",
        " ".join(doc["argv"]),
        *doc["commands"],
        "```",
        "",
    ]
    return "\n".join(parts)


def emit(doc: dict[str, Any], out_dir: Path) -> None:
    """Print the Markdown and write <timestamp>.md and .json under `out_dir`."""
    text = markdown(doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / doc["timestamp"]
    base.with_suffix(".md").write_text(text)
    opts = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    base.with_suffix(".json").write_bytes(orjson.dumps(doc, option=opts))
    print(text)
    print(f"written: {base}.md and {base}.json", file=sys.stderr)
