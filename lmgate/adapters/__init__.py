"""Provider adapters: non-OpenAI upstreams (ARGO, Anthropic) converted to OpenAI's API.

`create_adapter(provider_type, options)` gives the adapter of a provider type; see
`base.Adapter` for the interface and `messages_entrance` for the Anthropic-compatible
`/v1/messages` entrance.
"""

from __future__ import annotations

from collections.abc import Mapping

from lmgate.adapters.anthropic import AnthropicAdapter, AnthropicOptions
from lmgate.adapters.argo import ArgoAdapter, ArgoOptions
from lmgate.adapters.base import Adapter, Context, OpenAIAdapter, StreamConverter, UpstreamCall

__all__ = [
    "Adapter",
    "AnthropicAdapter",
    "ArgoAdapter",
    "Context",
    "OpenAIAdapter",
    "StreamConverter",
    "UpstreamCall",
    "create_adapter",
]

PROVIDER_TYPES = ("openai", "argo", "anthropic")


def create_adapter(provider_type: str, options: Mapping[str, object] | None = None) -> Adapter:
    """The adapter for a provider type, from the provider's settings.

    ARGO reads `argo_user` (str), `argo_user_per_key` (bool), `argo_models` (dict of public
    name -> ARGO name) and `argo_no_system_models` (list of fnmatch patterns); Anthropic reads
    `anthropic_version` (str) and `default_max_tokens` (int). Absent or None: the defaults.
    """
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if provider_type == "openai":
        return OpenAIAdapter()
    if provider_type == "argo":
        argo = ArgoOptions(
            user=_str(opts.get("argo_user")),
            user_per_key=bool(opts.get("argo_user_per_key", False)),
            models={str(k): str(v) for k, v in _dict(opts.get("argo_models")).items()},
        )
        patterns = opts.get("argo_no_system_models")
        if isinstance(patterns, list | tuple):
            argo = ArgoOptions(argo.user, argo.user_per_key, argo.models, tuple(map(str, patterns)))
        return ArgoAdapter(argo)
    if provider_type == "anthropic":
        defaults = AnthropicOptions()
        max_tokens = opts.get("default_max_tokens", defaults.default_max_tokens)
        return AnthropicAdapter(
            AnthropicOptions(
                version=str(opts.get("anthropic_version", defaults.version)),
                default_max_tokens=max_tokens if isinstance(max_tokens, int) else 4096,
            )
        )
    raise ValueError(f"unknown provider type {provider_type!r}")


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _dict(value: object) -> Mapping[object, object]:
    return value if isinstance(value, Mapping) else {}
