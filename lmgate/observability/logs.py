"""Logs: one JSON line per request, JSON formatting for every lmgate logger, secret redaction.

Request lines go through the standard `logging` module (logger `lmgate.requests`, level
INFO), so handlers, levels and filters apply as usual. `Logger.info` costs some 15 µs here,
mostly in building the `LogRecord` (caller lookup, thread and process names); `RequestLog`
builds its records from a template instead and hands them to `Logger.handle`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from lmgate.accounting.ledger import LedgerEntry

REQUEST_LOGGER = "lmgate.requests"
_LINE = "lmgate_line"
"""A record attribute: the record's `msg` is already a complete JSON object."""
_SECRET = re.compile(r"\b(lmg-|sk-)[A-Za-z0-9_\-]{16,}|\b(Bearer\s+)[^\s\"',;]+", re.IGNORECASE)
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def redact(text: str) -> str:
    """`text` with anything that looks like a key or a bearer token replaced by `***`.

    Key prefixes as the admin API shows them (`lmg-` and 8 characters) are kept.
    """
    return _SECRET.sub(_mask, text)


def _mask(m: re.Match[str]) -> str:
    return (m.group(1) or m.group(2)) + "***"


class RequestLog:
    """Writes one JSON line per request to the `lmgate.requests` logger.

    Never a body unless `bodies` is set (and the key logs them: `LedgerEntry.bodies`).
    """

    def __init__(self, enabled: bool = True, bodies: bool = False) -> None:
        self.enabled = enabled
        self.bodies = bodies
        self.logger = logging.getLogger(REQUEST_LOGGER)
        template = self.logger.makeRecord(
            REQUEST_LOGGER, logging.INFO, __file__, 0, "", (), None, "write"
        )
        template.__dict__[_LINE] = True
        self._template = template.__dict__
        self._created = template.created
        self._relative = template.relativeCreated

    def write(self, entry: LedgerEntry, user: str | None, key_prefix: str | None) -> None:
        """Log `entry` as one line; `user` is the user's name, `key_prefix` the key's prefix."""
        if not self.enabled or not self.logger.isEnabledFor(logging.INFO):
            return
        fields: dict[str, Any] = {
            "request_id": entry.request_id,
            "time": entry.created_at,
            "user": user,
            "key": key_prefix,
            "model": entry.model,
            "deployment": entry.deployment,
            "status": entry.status,
            "prompt_tokens": entry.prompt_tokens,
            "completion_tokens": entry.completion_tokens,
            "cost": entry.cost,
            "latency_ms": round(entry.latency_ms, 3),
            "ttft_ms": None if entry.ttft_ms is None else round(entry.ttft_ms, 3),
            "streamed": entry.streamed,
            "cache_hit": entry.cache_hit,
            "error": entry.error_type,
        }
        if self.bodies and entry.bodies is not None:
            fields["request_body"], fields["response_body"] = entry.bodies
        record = logging.LogRecord.__new__(logging.LogRecord)
        record.__dict__ = self._template.copy()
        record.msg = orjson.dumps(fields, option=orjson.OPT_UTC_Z).decode()
        now = time.time()
        record.created = now
        record.msecs = (now - int(now)) * 1000
        record.relativeCreated = self._relative + (now - self._created) * 1000
        self.logger.handle(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO, UTC), level, logger, message, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, _LINE, False):
            return str(record.msg)
        obj: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            obj["exc_info"] = record.exc_text
        if record.stack_info:
            obj["stack_info"] = record.stack_info
        return orjson.dumps(obj, option=orjson.OPT_UTC_Z).decode()


class RedactSecrets(logging.Filter):
    """Defence in depth: masks keys and bearer tokens in messages and tracebacks.

    Request lines are built from fields that hold no secret and are not searched.
    """

    _traceback = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _LINE, False):
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: let the handler report it
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class _Handler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (and replaces when called again)."""


def configure_logging(level: str, json: bool, stream: TextIO | None = None) -> None:
    """Send every `lmgate.*` logger to `stream` (stderr), as JSON lines or as text.

    Secrets are redacted from messages; the loggers no longer propagate to the root logger,
    so that nothing is written twice.
    """
    root = logging.getLogger("lmgate")
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if json else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(RedactSecrets())
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
