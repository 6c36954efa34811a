"""Run the load generators (wrk with post.lua, and ttft.py) pinned, and parse their output."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "post.lua"
TTFT_SCRIPT = BENCH_DIR / "ttft.py"
RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class CommandLog:
    """Every command the harness ran, in order, for the report."""

    commands: list[str] = field(default_factory=list)

    def add(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Record `cmd`, prefixed with the environment variables it was given."""
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        line = shlex.join(cmd)
        self.commands.append(f"{prefix} {line}" if prefix else line)


def wrk_cmd(url: str, concurrency: int, duration_s: int, timeout_s: int, cpus: str) -> list[str]:
    """The pinned wrk command line: one thread, `concurrency` connections."""
    return [
        "taskset", "-c", cpus,
        "wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", f"--timeout={timeout_s}s",
        "--latency", "-s", str(LUA_SCRIPT), url,
    ]  # fmt: skip


def parse_wrk(stdout: str) -> dict[str, Any]:
    """Turn post.lua's BENCH_RESULT line into figures (ms, requests/s)."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            raw = orjson.loads(line[len(RESULT_PREFIX) :])
            break
    else:
        raise RuntimeError(f"no {RESULT_PREFIX.strip()} line in wrk output:\n{stdout}")
    lat = raw["latency_us"]
    duration = raw["duration_us"] / 1e6
    errors = raw["errors"]
    return {
        "requests": raw["requests"],
        "duration_s": round(duration, 3),
        "rps": raw["requests"] / duration if duration else 0.0,
        "errors": errors,
        "error_total": sum(errors.values()),
        **{f"{k}_ms": lat[k] / 1000 for k in ("p50", "p90", "p99", "p999", "mean", "max")},
    }


def run_wrk(
    log: CommandLog,
    url: str,
    concurrency: int,
    duration_s: int,
    *,
    model: str = "bench-model",
    api_key: str = "sk-bench",
    timeout_s: int = 10,
    cpus: str = "1",
) -> dict[str, Any]:
    """One wrk run of `duration_s` seconds."""
    cmd = wrk_cmd(url, concurrency, max(1, duration_s), timeout_s, cpus)
    extra = {"BENCH_MODEL": model, "BENCH_API_KEY": api_key}
    log.add(cmd, extra)
    proc = subprocess.run(
        cmd,
        env={**os.environ, **extra},
        capture_output=True,
        text=True,
        timeout=duration_s + timeout_s + 60,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr}\n{proc.stdout}")
    result = parse_wrk(proc.stdout)
    result["concurrency"] = concurrency
    return result


def run_ttft(
    log: CommandLog,
    url: str,
    concurrency: int,
    iterations: int,
    *,
    warmup: int,
    max_seconds: float,
    api_key: str = "sk-bench",
    model: str = "stream-model",
    chunks: int = 4,
    cpus: str = "1",
) -> dict[str, Any]:
    """Run bench/ttft.py pinned to `cpus` and return its JSON summary."""
    cmd = [
        "taskset", "-c", cpus, sys.executable, str(TTFT_SCRIPT),
        "--url", url, "--model", model, "--api-key", api_key,
        "--concurrency", str(concurrency), "--iterations", str(iterations),
        "--warmup", str(warmup), "--max-seconds", str(max_seconds),
        "--max-tokens", str(chunks),
    ]  # fmt: skip
    log.add(cmd)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=max_seconds * 3 + 120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ttft.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result: dict[str, Any] = orjson.loads(proc.stdout.strip().splitlines()[-1])
    result["concurrency"] = concurrency
    return result
