"""The `cache` section of the configuration file."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MiB = 1024 * 1024


class CacheSettings(BaseModel):
    """Response cache: where answers are kept, for how long, and whom they are shared with."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="answer repeated requests from the cache")
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: per process; redis: shared by every replica"
    )
    redis_url: str | None = Field(None, description="redis://host:6379/0 (backend: redis)")
    redis_prefix: str = Field("lmgate:cache:", description="prefix of every Redis key")
    redis_timeout: float = Field(
        0.25, gt=0, le=10, description="seconds to wait for Redis before answering without it"
    )
    max_bytes: int = Field(64 * MiB, ge=0, description="memory backend: total size bound")
    max_entry_bytes: int = Field(MiB, ge=1, description="larger answers are not cached")
    default_ttl: int = Field(3600, ge=1, description="seconds an answer is kept")
    scope: Literal["key", "team", "global"] = Field(
        "key", description="who shares answers: callers with the same key, team, or everyone"
    )
    only_deterministic: bool = Field(
        True, description="cache chat/completions only with temperature 0 or a seed"
    )
    bill_hits: bool = Field(False, description="charge a hit like the original answer")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> CacheSettings:
        if self.enabled and self.backend == "redis" and not self.redis_url:
            raise ValueError("backend `redis` needs `redis_url`")
        return self
