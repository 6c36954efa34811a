"""`lmgate init`: write a first configuration by answering a few questions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from lmgate.cli.doctor import TimeoutOption, results_table
from lmgate.cli.models import public_url
from lmgate.config.defaults import OLLAMA_URL
from lmgate.config.loader import ConfigError, parse_config
from lmgate.config.schema import GatewayConfig, ProviderConfig
from lmgate.upstream.probe import probe_all
from lmgate.upstream.provider import Provider, env_proxy_for

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MASK = "********"
_SHOWN_MODELS = 12


@dataclass(frozen=True)
class Preset:
    """A kind of provider: its usual name, address and API key variable."""

    label: str
    name: str
    base_url: str
    key_var: str | None
    asks_key: bool = True


PRESETS = (
    Preset("OpenAI", "openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
    Preset("Mistral", "mistral", "https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    Preset("Ollama (local)", "ollama", f"{OLLAMA_URL}/v1", None, asks_key=False),
    Preset("vLLM or any OpenAI-compatible URL", "vllm", "http://127.0.0.1:8000/v1", None),
)


@dataclass
class Draft:
    """A provider being set up: the answers so far."""

    name: str
    base_url: str
    secret: str = ""
    """The key itself: used for the check, written only when `key_var` is None."""
    key_var: str | None = None
    """Write `${key_var}` instead of the key."""
    proxy: str | None = None
    discover: bool = False
    models: list[str] = field(default_factory=list)

    def entry(self, mask: bool) -> dict[str, Any]:
        """The provider's entry in the configuration file; `mask` hides secrets."""
        entry: dict[str, Any] = {"base_url": self.base_url}
        if self.key_var:
            entry["api_key"] = "${" + self.key_var + "}"
        elif self.secret:
            entry["api_key"] = _MASK if mask else self.secret
        if self.proxy:
            entry["proxy"] = _mask_password(self.proxy) if mask else self.proxy
        if self.discover:
            entry["discover_models"] = True
        return entry

    def provider(self) -> Provider:
        """A live provider for the check, with the real key."""
        cfg = ProviderConfig(base_url=self.base_url, api_key=self.secret or None, proxy=self.proxy)
        return Provider(self.name, cfg)


def init(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the configuration.")
    ] = Path("lmgate.yaml"),
    port: Annotated[
        int | None, typer.Option(help="Port the gateway will listen on; default: a free one.")
    ] = None,
    timeout: TimeoutOption = 10.0,
) -> None:
    """Write a first configuration: providers, keys, proxies and models, checked live."""
    console = Console()
    if not output.parent.is_dir():
        raise typer.BadParameter(f"{output.parent} is not a directory", param_hint="--output")
    if output.exists() and not typer.confirm(f"{output} exists. Replace it?", default=False):
        raise typer.Exit(1)
    console.print("[bold]lmgate setup[/]: add the providers the gateway should reach.")
    drafts = _ask_providers(console)
    port = port or free_port()
    console.print(f"The gateway will listen on http://127.0.0.1:{port}/v1")
    drafts = _check(console, drafts, timeout)
    _review_and_write(console, drafts, port, output)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ask_providers(console: Console) -> list[Draft]:
    drafts: list[Draft] = []
    while True:
        drafts.append(_ask_provider(console, {d.name for d in drafts}))
        if not typer.confirm("Add another provider?", default=False):
            return drafts


def _ask_provider(console: Console, taken: set[str]) -> Draft:
    """One provider's type, name, address, key and proxy."""
    menu = Table.grid(padding=(0, 2))
    for i, p in enumerate(PRESETS, 1):
        menu.add_row(f"  {i}", p.label, p.base_url)
    console.print(menu)
    preset = typer.prompt("Provider type", default="1", value_proc=_preset_check)
    name = typer.prompt("Name", default=_unused(preset.name, taken), value_proc=_name_check(taken))
    base_url = typer.prompt(
        "Base URL", default=preset.base_url, value_proc=_field_check("base_url")
    )
    draft = Draft(name, base_url)
    if preset.asks_key:
        draft.secret, draft.key_var = _ask_key(console, preset, name)
    env_proxy = env_proxy_for(base_url)
    empty = f"the environment's {public_url(env_proxy)}" if env_proxy else "none"
    draft.proxy = typer.prompt(
        f"Outbound proxy: socks5://, socks5h:// or http:// URL (empty: {empty})",
        default="",
        show_default=False,
        value_proc=_field_check("proxy"),
    )
    return draft


def _ask_key(console: Console, preset: Preset, name: str) -> tuple[str, str | None]:
    """The API key for the check, and the variable to write as `${VAR}` instead (or None)."""
    var = preset.key_var
    if var and os.environ.get(var) and typer.confirm(f"Use ${{{var}}} (it is set)?", default=True):
        return os.environ[var], var
    key = typer.prompt(
        "API key (hidden; empty: none; ${VAR}: read it from the environment)",
        default="",
        show_default=False,
        hide_input=True,
    ).strip()
    ref = _ENV_REF.fullmatch(key)
    if ref:
        if ref[1] not in os.environ:
            console.print(f"[yellow]{ref[1]} is not set[/]: the check goes without a key")
        return os.environ.get(ref[1], ""), ref[1]
    if key and typer.confirm(
        "Write a ${VAR} reference to the environment instead of the key?", default=False
    ):
        default = var or re.sub(r"\W", "_", name).upper() + "_API_KEY"
        return key, typer.prompt("Variable name", default=default, value_proc=_var_check)
    return key, None


def _check(console: Console, drafts: list[Draft], timeout: float) -> list[Draft]:
    """Probe every provider, then choose the models of those that answer."""
    console.print("Checking that each provider answers…")
    providers = [d.provider() for d in drafts]
    results = asyncio.run(probe_all(providers, timeout))
    console.print(results_table(providers, results))
    kept = []
    for draft, result in zip(drafts, results, strict=True):
        if result.ok:
            _choose_models(console, draft, result.models)
        elif not typer.confirm(f"Keep {draft.name} anyway?", default=True):
            continue
        kept.append(draft)
    if not kept:
        console.print("No provider left: nothing written.")
        raise typer.Exit(1)
    return kept


def _choose_models(console: Console, draft: Draft, found: list[str]) -> None:
    """Expose all the provider's models (discovery) or the ones the user names."""
    name = escape(draft.name)
    console.print(f"Any request for {name}/<model> goes to {name}.")
    if not found:
        return
    more = len(found) - _SHOWN_MODELS
    shown = ", ".join(found[:_SHOWN_MODELS]) + (f", … ({more} more)" if more > 0 else "")
    console.print(f"{name} offers {len(found)} model(s): {escape(shown)}")
    if typer.confirm(
        f"List all of them (as {draft.name}/<model>, found at every start)?", default=True
    ):
        draft.discover = True
        return
    answer = typer.prompt(
        "Models to list under their own names, comma-separated (empty: none)",
        default="",
        show_default=False,
    )
    draft.models = list(dict.fromkeys(m.strip() for m in answer.split(",") if m.strip()))
    for m in draft.models:
        if m not in found:
            console.print(f"[yellow]warning:[/] {name} does not list {escape(m)}")


def _review_and_write(console: Console, drafts: list[Draft], port: int, output: Path) -> None:
    """Show the configuration with secrets masked, validate it, and write it on confirmation."""
    text = _render(drafts, port, mask=False)
    preview = Syntax(_render(drafts, port, mask=True), "yaml", theme="ansi_dark")
    console.print(Panel(preview, expand=False, title=f"{escape(str(output))} (secrets masked)"))
    env = {**os.environ, **{d.key_var: d.secret for d in drafts if d.key_var}}
    try:
        parse_config(text, source=str(output), env=env)
    except ConfigError as e:
        console.print(f"[red]the configuration is invalid:[/]\n{escape(str(e))}")
        raise typer.Exit(2) from None
    if not typer.confirm(f"Write it to {output}?", default=True):
        console.print("Nothing written.")
        raise typer.Exit(1)
    write_private(output, text)
    console.print(f"Wrote {escape(str(output))} (readable by you only).")
    for var in sorted({d.key_var for d in drafts if d.key_var and d.key_var not in os.environ}):
        console.print(f"Before starting the gateway: export {var}=<the key>")
    console.print(f"Check it:  lmgate doctor --config {escape(str(output))}")
    console.print(f"Start it:  lmgate serve --config {escape(str(output))}")


def _render(drafts: list[Draft], port: int, mask: bool) -> str:
    """The configuration file's YAML."""
    doc: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "providers": {d.name: d.entry(mask) for d in drafts},
    }
    models: list[dict[str, str]] = []
    used: set[str] = set()
    for d in drafts:
        for m in d.models:
            public = f"{d.name}/{m}" if m in used else m
            used.add(public)
            models.append({"name": public, "provider": d.name, "model": m})
    if models:
        doc["models"] = models
    return yaml.safe_dump(doc, sort_keys=False)


def write_private(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically; the file is readable by its owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _unused(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`… if it is taken."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _preset_check(answer: str) -> Preset:
    if answer.strip() not in [str(i) for i in range(1, len(PRESETS) + 1)]:
        raise typer.BadParameter(f"answer a number from 1 to {len(PRESETS)}")
    return PRESETS[int(answer) - 1]


def _name_check(taken: set[str]) -> Callable[[str], str]:
    def check(name: str) -> str:
        name = name.strip()
        if name in taken:
            raise typer.BadParameter(f"{name} is already used")
        try:
            GatewayConfig(providers={name: ProviderConfig(base_url="http://localhost")})
        except ValidationError:
            raise typer.BadParameter(
                "use letters, digits and . _ : @ - (starting with a letter or digit)"
            ) from None
        return name

    return check


def _field_check(name: str) -> Callable[[str], Any]:
    """Validate one provider field as the configuration schema would."""

    def check(value: str) -> Any:
        data = {"base_url": "http://localhost", name: value.strip() or None}
        try:
            return getattr(ProviderConfig.model_validate(data), name)
        except ValidationError as e:
            raise typer.BadParameter(e.errors()[0]["msg"].removeprefix("Value error, ")) from None

    return check


def _var_check(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise typer.BadParameter("letters, digits and _ only, not starting with a digit")
    return name


def _mask_password(url: str) -> str:
    """`url` with the password in its user info masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:{_MASK}@{hostport}").geturl()
