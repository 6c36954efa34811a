"""`lmgate models`: where every configured model name routes, read from the configuration."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from lmgate.cli.serve import ConfigOption, load_or_exit
from lmgate.config.defaults import embedded_config, ollama_answers
from lmgate.config.loader import ConfigError, parse_config
from lmgate.config.schema import GatewayConfig, ModelConfig

EMBEDDED = "<embedded defaults>"


def models(config: ConfigOption = None) -> None:
    """Show every configured model, its aliases and its deployments. No network needed."""
    cfg = config_or_defaults(config)
    console = Console()
    if config is None:
        console.print(f"no --config: showing the {EMBEDDED} (as `lmgate serve` would use)")
    if cfg.models:
        console.print(_models_table(cfg))
    else:
        console.print("no models configured")
    for name, provider in cfg.providers.items():
        url = escape(public_url(provider.base_url))
        if provider.wildcard:
            console.print(f"{escape(name)}/* -> {escape(name)} ({url})")
        if provider.discover_models:
            console.print(f"{escape(name)}: lists its own models at start, as {escape(name)}/<id>")


def config_or_defaults(path: Path | None) -> GatewayConfig:
    """The configuration at `path`, or the embedded defaults `lmgate serve` would use.

    The defaults include no demo model: no worker is started.
    """
    if path is not None:
        return load_or_exit(path)
    text = embedded_config(os.environ, None, ollama_answers())
    try:
        return parse_config(text, source=EMBEDDED, env=os.environ)
    except ConfigError as e:
        typer.echo(f"configuration error:\n{e}", err=True)
        raise typer.Exit(2) from None


def public_url(url: str) -> str:
    """`url` without its user name and password."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _models_table(cfg: GatewayConfig) -> Table:
    table = Table(
        "model",
        "aliases",
        "provider",
        "upstream model",
        "weight",
        Column("base URL", overflow="fold"),
    )
    for m in cfg.models:
        for i, d in enumerate(m.deployments):
            upstream = d.model or _upstream_name(m)
            base_url = public_url(cfg.providers[d.provider].base_url)
            table.add_row(
                escape(m.name) if i == 0 else "",
                escape(", ".join(m.aliases)) if i == 0 else "",
                escape(d.provider),
                escape(upstream),
                f"{d.weight:g}",
                escape(base_url),
                end_section=i == len(m.deployments) - 1,
            )
    return table


def _upstream_name(m: ModelConfig) -> str:
    """The upstream name of a deployment that names none."""
    return "(the requested name)" if "*" in m.name else m.name
