"""The embedded configuration used when `lmgate serve` is given no file."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from pathlib import Path

import yaml

OLLAMA_URL = "http://127.0.0.1:11434"
DEMO_MODEL = "lmgate-demo"

# Providers found through an API key in the environment: name -> (key variable, base URL).
_ENV_PROVIDERS = {
    "openai": ("OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "mistral": ("MISTRAL_API_KEY", "MISTRAL_BASE_URL", "https://api.mistral.ai/v1"),
}


def ollama_answers(url: str = OLLAMA_URL, timeout: float = 0.5) -> bool:
    """Whether an Ollama server answers at `url`."""
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, ValueError):
        return False


def embedded_config(env: Mapping[str, str], demo_url: str | None, ollama: bool) -> str:
    """The default configuration as YAML; keys stay `${VAR}` references, never values."""
    providers: dict[str, dict[str, object]] = {}
    models: list[dict[str, object]] = []
    for name, (key_var, url_var, url) in _ENV_PROVIDERS.items():
        if env.get(key_var):
            providers[name] = {
                "base_url": env.get(url_var) or url,
                "api_key": "${" + key_var + "}",
                "discover_models": True,
            }
    if ollama:
        providers["ollama"] = {"base_url": f"{OLLAMA_URL}/v1", "discover_models": True}
    if demo_url:
        providers["demo"] = {"base_url": demo_url}
        models.append({"name": DEMO_MODEL, "provider": "demo", "owned_by": "lmgate"})
    doc = {
        "server": {"host": "127.0.0.1", "port": 4000},
        # A first run needs no key; its ledger lives in the current directory.
        "auth": {"enabled": False},
        "database": {"url": f"sqlite+aiosqlite:///{Path.cwd() / 'lmgate.db'}"},
        "accounting": {"spool_path": str(Path.cwd() / "lmgate-ledger.spool")},
        "providers": providers,
        "models": models,
    }
    return yaml.safe_dump(doc, sort_keys=False)
