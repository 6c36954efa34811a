"""The configuration file's schema: server settings, providers, models, routing."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from lmgate.backends.config import BackendConfig, BackendsSettings
from lmgate.cache.config import CacheSettings
from lmgate.limits.config import LimitsSettings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
_PROXY_SCHEMES = ("socks5://", "socks5h://", "socks4://", "http://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    """How the gateway listens."""

    host: str = "127.0.0.1"
    port: int = Field(4000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    access_log: bool = False
    default_provider: str | None = Field(
        None, description="provider for /v1/... pass-through requests that name no model"
    )


class Timeouts(_Strict):
    """Seconds; `read` is the longest wait for the next byte from the upstream."""

    connect: float = Field(10.0, gt=0)
    read: float = Field(600.0, gt=0)


class ProviderConfig(_Strict):
    """An upstream API: where it is, how to authenticate, how to reach it."""

    type: Literal["openai", "argo", "anthropic"] = Field(
        "openai", description="the API the provider speaks; see docs/providers.md"
    )
    base_url: str
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: Timeouts = Field(default_factory=Timeouts)
    proxy: str | None = Field(None, description="socks5://, socks5h:// or http:// proxy URL")
    wildcard: bool = Field(True, description="route any `<provider>/<model>` to this provider")
    max_connections: int = Field(1000, ge=1)
    discover_models: bool = Field(False, description="list the provider's models at start")
    argo_user: str | None = Field(None, description="ARGO: the user name sent with requests")
    argo_user_per_key: bool = Field(False, description="ARGO: send the caller's lmgate user")
    argo_models: dict[str, str] = Field(
        default_factory=dict, description="ARGO: public model name -> ARGO model name"
    )
    argo_no_system_models: list[str] = Field(
        default_factory=lambda: ["gpto1preview", "gpto1mini"],
        description="ARGO: models (shell patterns) whose system prompt joins the first user turn",
    )
    anthropic_version: str = Field("2023-06-01", description="Anthropic: `anthropic-version`")
    default_max_tokens: int = Field(
        4096, ge=1, description="Anthropic: `max_tokens` when the request gives none"
    )

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v and not v.startswith(_PROXY_SCHEMES):
            raise ValueError(f"proxy scheme must be one of {', '.join(_PROXY_SCHEMES)}")
        return v or None

    @field_validator("anthropic_version", mode="before")
    @classmethod
    def _version(cls, v: object) -> object:
        return v.isoformat() if isinstance(v, date) else v  # YAML reads 2023-06-01 as a date

    @model_validator(mode="after")
    def _type_options(self) -> ProviderConfig:
        if self.type == "argo" and not (self.argo_user or self.argo_user_per_key):
            raise ValueError("`type: argo` needs `argo_user` (or `argo_user_per_key`)")
        for name in sorted(self.model_fields_set):
            if name.startswith("argo_") and self.type != "argo":
                raise ValueError(f"`{name}` needs `type: argo`")
            if name in ("anthropic_version", "default_max_tokens") and self.type != "anthropic":
                raise ValueError(f"`{name}` needs `type: anthropic`")
        return self


class DeploymentConfig(_Strict):
    """One place a model is served: a provider and the upstream's name for the model."""

    provider: str
    model: str | None = Field(None, description="the upstream's model name; default: the name")
    weight: float = Field(1.0, gt=0)
    max_inflight: int | None = Field(
        None, ge=1, description="requests at once on this deployment, from every caller"
    )


class ModelConfig(_Strict):
    """A public model name, its aliases, and the deployments that serve it."""

    name: str
    aliases: list[str] = Field(default_factory=list)
    provider: str | None = Field(None, description="shorthand for a single deployment")
    model: str | None = None
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    owned_by: str | None = None
    backend: BackendConfig | None = Field(
        None, description="a model lmgate launches itself (SLURM job or local process)"
    )

    @model_validator(mode="after")
    def _one_form(self) -> ModelConfig:
        if self.backend is not None:
            if self.provider or self.deployments:
                raise ValueError("a model with `backend` has no `provider` or `deployments`")
            if "*" in self.name:
                raise ValueError("a managed model needs a plain name, not a `*` pattern")
            return self
        if self.provider and self.deployments:
            raise ValueError("give either `provider` or `deployments`, not both")
        if self.provider:
            self.deployments = [DeploymentConfig(provider=self.provider, model=self.model)]
        elif self.model:
            raise ValueError("`model` needs `provider`; inside `deployments` set it per deployment")
        if not self.deployments:
            raise ValueError("a model needs `provider` or at least one deployment")
        if "*" in self.name and self.aliases:
            raise ValueError("a `*` pattern cannot have aliases")
        return self


class RoutingSettings(_Strict):
    """Retries across deployments, the cool-down of failing ones, active health checks."""

    retries: int = Field(2, ge=0, description="extra attempts on other deployments")
    allowed_fails: int = Field(3, ge=1, description="consecutive failures before a cool-down")
    cooldown: float = Field(30.0, ge=0, description="seconds a failing deployment rests")
    health_check_interval: float | None = Field(
        None, gt=0, description="seconds between active health checks; None: off"
    )
    health_check_path: str = Field("/models", description="probed under each base URL")
    health_check_timeout: float = Field(5.0, gt=0)
    unhealthy_after: int = Field(2, ge=1, description="failed checks before leaving rotation")


class ObservabilitySettings(_Strict):
    """Metrics and logs."""

    metrics: bool = Field(True, description="serve Prometheus metrics at /metrics")
    request_log: bool = Field(True, description="one JSON line per request")
    log_format: Literal["json", "text"] = "json"
    log_level: str = "info"


class DatabaseSettings(_Strict):
    """Where keys, budgets and the ledger live."""

    url: str | None = Field(
        None,
        description="SQLAlchemy async URL (sqlite+aiosqlite:///..., postgresql+asyncpg://...); "
        "default: lmgate.db beside the configuration file",
    )
    migrate_on_start: bool = True


class AuthSettings(_Strict):
    """Virtual keys."""

    enabled: bool = Field(True, description="require a virtual key on every /v1 request")
    admin_key: SecretStr | None = Field(
        None, description="protects /admin/; LMGATE_ADMIN_KEY in the environment also works"
    )
    refresh_interval: float = Field(
        0.5, gt=0, le=60, description="seconds between checks for new, changed or revoked keys"
    )


class PriceConfig(_Strict):
    """US dollars per million tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)
    cached_input: float | None = Field(None, ge=0)


class AccountingSettings(_Strict):
    """The usage ledger, prices and budgets."""

    enabled: bool = Field(True, description="meter every request into the ledger")
    prices: dict[str, PriceConfig] = Field(
        default_factory=dict, description="per model name; overrides the shipped table"
    )
    default_max_tokens: int = Field(
        4096, ge=1, description="completion tokens reserved against budgets when not given"
    )
    flush_interval: float = Field(1.0, gt=0, description="seconds between ledger writes")
    batch_size: int = Field(500, ge=1, le=10000)
    spool_path: str | None = Field(
        None, description="file for records while the database is down; default beside the db"
    )
    body_log_retention_days: int = Field(30, ge=1)


class GatewayConfig(_Strict):
    """The whole configuration file."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    accounting: AccountingSettings = Field(default_factory=AccountingSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    backends: BackendsSettings = Field(default_factory=BackendsSettings)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def base_dir(self) -> Path:
        """The configuration file's folder: relative paths and the default database live here."""
        return self._base_dir

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        for name in v:
            if not _NAME.match(name) or name == "v1":
                raise ValueError(f"invalid provider name {name!r}")
        return v

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            for d in m.deployments:
                if d.provider not in self.providers:
                    raise ValueError(f"models[{i}] ({m.name}): unknown provider {d.provider!r}")
            for name in (m.name, *m.aliases):
                if name in seen:
                    raise ValueError(f"models[{i}]: the name {name!r} is used twice")
                seen.add(name)
        dp = self.server.default_provider
        if dp and dp not in self.providers:
            raise ValueError(f"server.default_provider: unknown provider {dp!r}")
        return self
