"""Database tables of managed backends: workers, per-model state and start-time history.

Declared on lmgate's `Base`, so Alembic's metadata holds them once this module is imported;
the tables are created by migration `0002_backends`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from lmgate.storage.models import UTC_TIME, Base


class BackendInstance(Base):
    """One worker: its job, where it listens and where it is in its life."""

    __tablename__ = "backend_instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), index=True)
    launcher: Mapped[str] = mapped_column(String(16))
    """`slurm` or `local`."""
    job_id: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    """`submitted`, `starting`, `ready`, `draining` or `ended`."""
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    secret_hash: Mapped[str] = mapped_column(String(64))
    """sha256 hex of the worker's registration secret."""
    reason: Mapped[str | None] = mapped_column(Text)
    inflight: Mapped[int] = mapped_column(Integer, default=0)
    """Requests in flight on the leader when it last looked (for `lmgate backends`)."""
    walltime_end: Mapped[datetime | None] = mapped_column(UTC_TIME)
    submitted_at: Mapped[datetime] = mapped_column(UTC_TIME)
    started_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    ready_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    ended_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME)


class BackendModel(Base):
    """A managed model's own state, and start/stop requests from any replica or the CLI."""

    __tablename__ = "backend_models"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    failed_reason: Mapped[str | None] = mapped_column(Text)
    """Set when launches keep failing; the model is not started again until `start`."""
    start_requested_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    """A request arrived while cold (on any replica), or `lmgate backends start`."""
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    """`lmgate backends stop`: the leader drains every worker of the model."""
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME)


class BackendStart(Base):
    """How long one worker took from submission to ready: the basis of Retry-After."""

    __tablename__ = "backend_starts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    model: Mapped[str] = mapped_column(String(200), index=True)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTC_TIME)
