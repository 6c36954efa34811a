"""The database schema: identities, keys, budgets, prices and the usage ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UTC_TIME = DateTime(timezone=True)


class Base(DeclarativeBase):
    """Declarative base of every lmgate table."""


class Team(Base):
    """A group of users that can share a budget."""

    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTC_TIME)


class User(Base):
    """A person (or service) that owns keys."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    role: Mapped[str] = mapped_column(String(16), default="user")
    """`admin` or `user`."""
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTC_TIME)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    log_bodies: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME, index=True)


class ApiKey(Base):
    """A virtual key: only its hash and a visible prefix are stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """sha256 hex of the whole key: keys are long random strings, so a fast hash is safe."""
    name: Mapped[str] = mapped_column(String(200), default="")
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTC_TIME)
    expires_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    revoked_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON)
    """Model names or `*` patterns; None allows every model."""
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Per-key rate limits (requests/tokens per minute, concurrency)."""
    log_bodies: Mapped[bool] = mapped_column(Boolean, default=False)
    last_used_at: Mapped[datetime | None] = mapped_column(UTC_TIME)
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME, index=True)
    """Bumped on every change, so that gateways can pick up revocations quickly."""


class Budget(Base):
    """A spending limit for a key, a user or a team over a period."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "scope_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(8))
    """`key`, `user` or `team`."""
    scope_id: Mapped[int] = mapped_column(Integer)
    amount: Mapped[float] = mapped_column(Float)
    """US dollars per period."""
    period: Mapped[str] = mapped_column(String(8))
    """`day`, `week`, `month` or `total`."""
    created_at: Mapped[datetime] = mapped_column(UTC_TIME)
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME, index=True)


class Price(Base):
    """A per-model price set through the admin API (overrides the shipped table)."""

    __tablename__ = "prices"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    input_per_mtok: Mapped[float] = mapped_column(Float, default=0.0)
    output_per_mtok: Mapped[float] = mapped_column(Float, default=0.0)
    cached_input_per_mtok: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTC_TIME)


class UsageRecord(Base):
    """One line of the ledger: one request."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_user_time", "user_id", "created_at"),
        Index("ix_usage_team_time", "team_id", "created_at"),
        Index("ix_usage_key_time", "key_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTC_TIME, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer)
    team_id: Mapped[int | None] = mapped_column(Integer)
    key_id: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(200))
    deployment: Mapped[str | None] = mapped_column(String(400))
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    streamed: Mapped[bool] = mapped_column(Boolean, default=False)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    """Token counts come from the offline tokenizer, not from the upstream."""
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    error_type: Mapped[str | None] = mapped_column(String(64))


class BodyLog(Base):
    """Request and response bodies, kept only for keys or users that opted in."""

    __tablename__ = "body_logs"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTC_TIME, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer)
    key_id: Mapped[int | None] = mapped_column(Integer)
    request: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
