"""Time to first token: open N concurrent SSE chat streams, repeatedly, and time the first event.

Each sample is the time from sending the request to receiving the first `data:` line.
Every stream is read to its end so connections are reused, as a real client would.
Prints one JSON object on stdout.

    python bench/ttft.py --url http://127.0.0.1:4000 --concurrency 32 --iterations 20
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from typing import Any

import aiohttp
import orjson


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def request_body(model: str, max_tokens: int) -> bytes:
    """A small streaming chat request."""
    return orjson.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Give me one sentence about the sea."},
            ],
            "max_tokens": max_tokens,
            "stream": True,
        }
    )


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """Seconds to the first `data:` line of one stream; the rest is read and dropped."""
    start = time.perf_counter()
    first = math.nan
    async with session.post(url, data=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for line in resp.content:
            if math.isnan(first) and line.startswith(b"data:"):
                first = time.perf_counter() - start
    if math.isnan(first):
        raise RuntimeError("stream ended without a data: event")
    return first


async def one_round(
    session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int
) -> tuple[list[float], list[str]]:
    """Run `concurrency` streams at once; return their TTFTs and error messages."""
    results = await asyncio.gather(
        *(one_stream(session, url, body) for _ in range(concurrency)), return_exceptions=True
    )
    samples = [r for r in results if isinstance(r, float)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    return samples, errors


def summarise(
    samples: list[float], errors: list[str], rounds: int, elapsed: float
) -> dict[str, Any]:
    """Percentiles in milliseconds, plus counts."""
    ordered = sorted(s * 1000 for s in samples)
    return {
        "samples": len(ordered),
        "rounds": rounds,
        "errors": len(errors),
        "first_errors": errors[:3],
        "elapsed_s": round(elapsed, 3),
        "min_ms": ordered[0] if ordered else math.nan,
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "max_ms": ordered[-1] if ordered else math.nan,
        "mean_ms": sum(ordered) / len(ordered) if ordered else math.nan,
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, then run bounded rounds of concurrent streams."""
    url = args.url.rstrip("/") + "/v1/chat/completions"
    body = request_body(args.model, args.max_tokens)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        for _ in range(args.warmup):
            await one_round(session, url, body, args.concurrency)
        samples: list[float] = []
        errors: list[str] = []
        start = time.perf_counter()
        rounds = 0
        while rounds < args.iterations and time.perf_counter() - start < args.max_seconds:
            got, failed = await one_round(session, url, body, args.concurrency)
            samples += got
            errors += failed
            rounds += 1
        return summarise(samples, errors, rounds, time.perf_counter() - start)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL, without /v1")
    p.add_argument("--model", default="stream-model")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--iterations", type=int, default=50, help="measured rounds")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--max-tokens", type=int, default=4, help="stream length in chunks")
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop starting rounds after")
    p.add_argument("--timeout", type=float, default=30.0, help="per-stream timeout, seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: print the summary as one JSON line."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        result = uvloop.run(measure(args))
    except ImportError:
        result = asyncio.run(measure(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
