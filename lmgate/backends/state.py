"""Backend state in the database: workers, per-model requests and failures, start times.

Every replica reads it (ready workers to route to, start requests from the CLI); only the
leader writes worker rows, except for registrations, which any replica may receive.
"""

from __future__ import annotations

import hashlib
import hmac
import statistics
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update

from lmgate.backends.instances import Instance
from lmgate.backends.models import BackendInstance, BackendModel, BackendStart
from lmgate.storage.db import Database
from lmgate.storage.timeutil import maybe_utc, utcnow

_HISTORY = 20


def hash_secret(secret: str) -> str:
    """sha256 hex of a worker's registration secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def secret_matches(secret: str, secret_hash: str) -> bool:
    """Constant-time check of a presented secret against a stored hash."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)


@dataclass(frozen=True)
class ModelRequests:
    """What the CLI or other replicas asked of a model."""

    start_requested_at: float | None
    stop_requested_at: float | None
    failed_reason: str | None


class BackendStore:
    """Reads and writes the backend tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def save(self, inst: Instance) -> None:
        """Insert or update a worker's row."""
        async with self.db.session() as s, s.begin():
            row = await s.get(BackendInstance, inst.id)
            if row is None:
                row = BackendInstance(id=inst.id, secret_hash=inst.secret_hash)
                s.add(row)
            row.model = inst.model
            row.launcher = inst.launcher
            row.job_id = inst.job_id
            row.state = inst.state
            row.host = inst.host
            row.port = inst.port
            row.reason = inst.reason
            row.inflight = inst.inflight
            left = inst.time_left()
            row.walltime_end = _dt(utcnow().timestamp() + left) if left is not None else None
            row.submitted_at = datetime.fromtimestamp(inst.submitted_at, UTC)
            row.started_at = _dt(inst.started_at)
            row.ready_at = _dt(inst.ready_at)
            row.ended_at = utcnow() if inst.state == "ended" else None
            row.updated_at = utcnow()

    async def live(self, models: list[str]) -> list[BackendInstance]:
        """Rows of workers that have not ended, for `models`."""
        async with self.db.session() as s:
            rows = await s.scalars(
                select(BackendInstance).where(
                    BackendInstance.model.in_(models), BackendInstance.state != "ended"
                )
            )
            return list(rows)

    async def get(self, instance_id: str) -> BackendInstance | None:
        """One worker's row."""
        async with self.db.session() as s:
            return await s.get(BackendInstance, instance_id)

    async def register(self, instance_id: str, host: str, port: int) -> None:
        """Record where a worker listens (from any replica)."""
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(BackendInstance)
                .where(BackendInstance.id == instance_id)
                .values(host=host, port=port, updated_at=utcnow())
            )

    async def record_start(self, model: str, seconds: float) -> None:
        """Remember how long a worker took to become ready."""
        async with self.db.session() as s, s.begin():
            s.add(BackendStart(model=model, seconds=seconds, created_at=utcnow()))

    async def start_times(self, model: str) -> list[float]:
        """The most recent start durations of `model`, newest first."""
        async with self.db.session() as s:
            rows = await s.scalars(
                select(BackendStart.seconds)
                .where(BackendStart.model == model)
                .order_by(BackendStart.id.desc())
                .limit(_HISTORY)
            )
            return list(rows)

    async def requests(self, models: list[str]) -> dict[str, ModelRequests]:
        """Start/stop requests and failure state per model."""
        async with self.db.session() as s:
            rows = await s.scalars(select(BackendModel).where(BackendModel.model.in_(models)))
            return {
                r.model: ModelRequests(
                    _ts(r.start_requested_at), _ts(r.stop_requested_at), r.failed_reason
                )
                for r in rows
            }

    async def set_model(self, model: str, **values: object) -> None:
        """Update (or create) a model's row: `failed_reason`, `start_requested_at`, ..."""
        async with self.db.session() as s, s.begin():
            row = await s.get(BackendModel, model)
            if row is None:
                row = BackendModel(model=model)
                s.add(row)
            for key, value in values.items():
                setattr(row, key, value)
            row.updated_at = utcnow()


def instance_from_row(row: BackendInstance, history_size: int) -> Instance:
    """A worker as a previous gateway left it in the database."""
    inst = Instance(
        id=row.id,
        model=row.model,
        launcher=row.launcher,
        secret_hash=row.secret_hash,
        port=row.port or 0,
        submitted_at=_ts(row.submitted_at) or 0.0,
        job_id=row.job_id,
        host=row.host,
        started_at=_ts(row.started_at),
        ready_at=_ts(row.ready_at),
        reason=row.reason,
        telemetry=deque(maxlen=history_size),
    )
    if row.state in ("submitted", "starting", "ready", "draining"):
        inst.state = row.state  # type: ignore[assignment]
    return inst


def estimate_start(history: list[float], default: float) -> float:
    """Expected seconds from submission to ready: the median of past starts."""
    return statistics.median(history) if history else default


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _ts(dt: datetime | None) -> float | None:
    value = maybe_utc(dt)
    return None if value is None else value.timestamp()
