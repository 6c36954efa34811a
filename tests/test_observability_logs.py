"""Request log lines and `configure_logging`: JSON, one object per line, no secrets."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from lmgate.accounting.ledger import LedgerEntry
from lmgate.observability.logs import RequestLog, configure_logging, redact

KEY = "lmg-" + "k" * 40
FIELDS = {
    "request_id",
    "time",
    "user",
    "key",
    "model",
    "deployment",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "latency_ms",
    "ttft_ms",
    "streamed",
    "cache_hit",
    "error",
}


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    """configure_logging into a buffer; the `lmgate` logger is restored afterwards."""
    root = logging.getLogger("lmgate")
    saved = (root.handlers[:], root.level, root.propagate)
    stream = io.StringIO()
    yield stream
    root.handlers, root.level, root.propagate = saved


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def entry(**changes: Any) -> LedgerEntry:
    fields: dict[str, Any] = {
        "request_id": "req-1",
        "created_at": datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "user_id": 7,
        "team_id": None,
        "key_id": 3,
        "model": "m1",
        "deployment": "up/m1",
        "status": 200,
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "cost": 0.00042,
        "latency_ms": 81.23456,
        "ttft_ms": 9.5,
        "streamed": True,
        "bodies": ('{"secret prompt": 1}', '{"answer": 2}'),
        **changes,
    }
    return LedgerEntry(**fields)


def test_request_line(out: io.StringIO) -> None:
    configure_logging("info", json=True, stream=out)
    RequestLog().write(entry(), "alice", "lmg-AbCdEfGh")
    RequestLog().write(entry(status=504, error_type="timeout", ttft_ms=None), None, None)
    first, second = lines(out)
    assert set(first) == FIELDS  # never a body unless configured
    assert first == {
        "request_id": "req-1",
        "time": "2026-01-02T03:04:05.678000Z",
        "user": "alice",
        "key": "lmg-AbCdEfGh",
        "model": "m1",
        "deployment": "up/m1",
        "status": 200,
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "cost": 0.00042,
        "latency_ms": 81.235,
        "ttft_ms": 9.5,
        "streamed": True,
        "cache_hit": False,
        "error": None,
    }
    assert second["status"] == 504 and second["error"] == "timeout"
    assert second["user"] is None and second["ttft_ms"] is None


def test_bodies_only_when_configured(out: io.StringIO) -> None:
    configure_logging("info", json=True, stream=out)
    RequestLog(bodies=True).write(entry(), "alice", None)
    RequestLog(bodies=True).write(entry(bodies=None), "alice", None)
    with_bodies, without = lines(out)
    assert with_bodies["request_body"] == '{"secret prompt": 1}'
    assert with_bodies["response_body"] == '{"answer": 2}'
    assert set(without) == FIELDS


def test_disabled_or_below_level_writes_nothing(out: io.StringIO) -> None:
    configure_logging("info", json=True, stream=out)
    log = RequestLog(enabled=False)
    log.write(entry(), "alice", None)
    configure_logging("warning", json=True, stream=out)
    RequestLog().write(entry(), "alice", None)
    assert out.getvalue() == ""


def test_text_format_keeps_the_json_object(out: io.StringIO) -> None:
    configure_logging("info", json=False, stream=out)
    RequestLog().write(entry(), "alice", None)
    line = out.getvalue().strip()
    assert " INFO lmgate.requests {" in line
    assert orjson.loads(line[line.index("{") :])["user"] == "alice"


def test_every_lmgate_logger_as_json(out: io.StringIO) -> None:
    configure_logging("debug", json=True, stream=out)
    configure_logging("debug", json=True, stream=out)  # again: still one handler
    logging.getLogger("lmgate.relay").warning("upstream %s failed: %d", "up/m1", 3)
    logging.getLogger("lmgate").debug("plain")
    logging.getLogger("elsewhere").error("not ours")
    first, second = lines(out)
    assert first["level"] == "warning" and first["logger"] == "lmgate.relay"
    assert first["message"] == "upstream up/m1 failed: 3"
    assert first["time"].endswith("Z") and "exc_info" not in first
    assert second["message"] == "plain"


def test_secrets_are_redacted(out: io.StringIO) -> None:
    configure_logging("info", json=True, stream=out)
    log = logging.getLogger("lmgate.test")
    log.warning("client sent %s", KEY)
    log.warning("headers: {'Authorization': 'Bearer abc.DEF-123'}")
    log.warning("upstream key sk-proj-%s leaked; prefix lmg-AbCdEfGh is fine", "x" * 30)
    try:
        raise ValueError(f"bad key {KEY}")
    except ValueError:
        log.exception("failed with sk-%s", "y" * 20)
    text = out.getvalue()
    assert KEY not in text and "abc.DEF" not in text and "xxxx" not in text and "yyyy" not in text
    a, b, c, d = lines(out)
    assert a["message"] == "client sent lmg-***"
    assert b["message"] == "headers: {'Authorization': 'Bearer ***'}"
    assert c["message"] == "upstream key sk-*** leaked; prefix lmg-AbCdEfGh is fine"
    assert d["message"] == "failed with sk-***"
    assert "Traceback" in d["exc_info"] and "ValueError: bad key lmg-***" in d["exc_info"]


def test_redact() -> None:
    assert redact("Bearer   tok") == "Bearer   ***"
    assert redact("bearer tok, next") == "bearer ***, next"
    assert redact("task-1234567890123456789") == "task-1234567890123456789"
