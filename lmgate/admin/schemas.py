"""Request and response bodies of the admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from lmgate.limits.config import LimitSpec

Role = Literal["admin", "user"]
Period = Literal["day", "week", "month", "total"]
T = TypeVar("T")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DataList(BaseModel, Generic[T]):
    """A list, in OpenAI's `{"object": "list", "data": [...]}` shape."""

    object: Literal["list"] = "list"
    data: list[T]


class UserCreate(_In):
    name: str = Field(min_length=1, max_length=200, examples=["alice"])
    email: str | None = Field(None, max_length=320, examples=["alice@example.org"])
    role: Role = "user"
    team: str | None = Field(None, description="an existing team", examples=["ml"])
    log_bodies: bool = False


class UserUpdate(_In):
    """Only the fields given change; `"team": null` removes the user from its team."""

    email: str | None = Field(None, max_length=320)
    role: Role | None = None
    team: str | None = Field(None, examples=["ml"])
    disabled: bool | None = None
    log_bodies: bool | None = None


class UserOut(_Out):
    id: int
    name: str
    email: str | None
    role: str
    team: str | None
    disabled: bool
    log_bodies: bool
    created_at: datetime
    updated_at: datetime


class TeamCreate(_In):
    name: str = Field(min_length=1, max_length=200, examples=["ml"])


class TeamOut(_Out):
    id: int
    name: str
    members: int
    created_at: datetime


class TeamDetail(TeamOut):
    users: list[UserOut]


class BudgetIn(_In):
    amount: float = Field(ge=0, description="US dollars per period", examples=[20.0])
    period: Period = "month"


class KeyCreate(_In):
    user: str = Field(examples=["alice"])
    name: str = Field("", max_length=200, examples=["laptop"])
    expires_in: str | None = Field(
        None, description="a duration: 30m, 12h, 180d, 2w", examples=["180d"]
    )
    models: list[str] | None = Field(
        None, description="allowed model names or `*` patterns", examples=[["gpt-4o*", "llama-*"]]
    )
    budget: BudgetIn | None = None
    log_bodies: bool = False
    limits: LimitSpec | None = Field(
        None, description="the key's own rate limits", examples=[{"rpm": 60, "tpm": 100000}]
    )


class KeyOut(_Out):
    id: int
    prefix: str = Field(examples=["lmg-AbCdEfGh"])
    name: str
    user: str
    status: Literal["active", "revoked", "expired"]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    allowed_models: list[str] | None
    log_bodies: bool
    last_used_at: datetime | None
    updated_at: datetime


class KeyCreated(KeyOut):
    key: str = Field(description="the secret: shown only in this response, never again")


class BudgetOut(_Out):
    scope: Literal["key", "user", "team"]
    name: str = Field(description="the user's or team's name, or the key's prefix")
    amount: float
    period: Period
    spent: float = Field(description="US dollars spent in the current period")
    period_start: datetime | None
    resets_at: datetime | None
    updated_at: datetime


class PriceIn(_In):
    input_per_mtok: float = Field(ge=0, examples=[2.5])
    output_per_mtok: float = Field(ge=0, examples=[10.0])
    cached_input_per_mtok: float | None = Field(None, ge=0, examples=[1.25])


class PriceOut(_Out):
    model: str
    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None
    updated_at: datetime


class UsageOut(_Out):
    name: str = Field(description="user, team or model name, or key prefix")
    id: int | None
    key_name: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost: float
    errors: int
    estimated: int


class UsageReport(DataList[UsageOut]):
    by: Literal["user", "team", "key", "model"]
    since: datetime
    until: datetime | None
