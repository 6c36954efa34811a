"""Rate-limit settings: what a key, user, team or model may do per minute and at once."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LimitSpec(BaseModel):
    """Requests and tokens per minute, and requests running at once; None: no limit."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    max_parallel: int | None = Field(None, ge=1, description="requests in flight at once")

    @classmethod
    def from_json(cls, value: Any) -> LimitSpec | None:
        """A key's stored limits (the `limits` column), or None when it has none."""
        if not isinstance(value, dict) or not value:
            return None
        return cls.model_validate({k: v for k, v in value.items() if k in cls.model_fields})


class LimitsSettings(BaseModel):
    """Where limits are held and the limits that apply to everyone."""

    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = Field(
        None, description="share limits (and budgets, revocations, cache) across replicas"
    )
    on_redis_failure: Literal["open", "closed"] = Field(
        "open",
        description="open: fall back to per-process limits and warn; closed: answer 503",
    )
    key: LimitSpec | None = Field(None, description="every key, unless the key has its own")
    user: dict[str, LimitSpec] = Field(
        default_factory=dict, description="by user name; `*` applies to every user"
    )
    team: dict[str, LimitSpec] = Field(
        default_factory=dict, description="by team name; `*` applies to every team"
    )
    model: dict[str, LimitSpec] = Field(
        default_factory=dict, description="by public model name: all callers together"
    )
