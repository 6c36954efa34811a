"""`lmgate doctor`: validate the configuration and check that every provider answers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from sqlalchemy.engine import make_url

from lmgate.accounting.prices import PriceBook, load_overrides
from lmgate.cli.models import config_or_defaults, public_url
from lmgate.cli.serve import ConfigOption
from lmgate.config.schema import GatewayConfig
from lmgate.storage.db import Database, database_url
from lmgate.upstream.probe import ProbeResult, probe_all
from lmgate.upstream.provider import Provider

TimeoutOption = Annotated[float, typer.Option(help="Seconds to wait for each provider.")]


def doctor(config: ConfigOption = None, timeout: TimeoutOption = 10.0) -> None:
    """Validate the configuration, then probe every provider (exit 1 if any fails)."""
    cfg = config_or_defaults(config)
    console = Console()
    source = "embedded defaults" if config is None else str(config)
    console.print(
        f"configuration ok ({escape(source)}): "
        f"{len(cfg.providers)} provider(s), {len(cfg.models)} model(s)"
    )
    if not cfg.providers:
        console.print("no providers to check: write a configuration with `lmgate init`")
        return
    providers = [Provider(name, c) for name, c in cfg.providers.items()]
    results = asyncio.run(probe_all(providers, timeout))
    console.print(results_table(providers, results))
    for line in model_warnings(cfg, {p.name: r for p, r in zip(providers, results, strict=True)}):
        console.print(f"[yellow]warning:[/] {escape(line)}")
    for line in price_warnings(cfg, asyncio.run(_database_prices(cfg))):
        console.print(f"[yellow]warning:[/] {escape(line)}")
    failed = [p.name for p, r in zip(providers, results, strict=True) if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} provider(s) failed:[/] {escape(', '.join(failed))}")
        raise typer.Exit(1)
    console.print("[green]every provider answers[/]")


def results_table(providers: Sequence[Provider], results: Sequence[ProbeResult]) -> Table:
    """One row per probed provider: where it is, how it is reached, what it answered."""
    table = Table(
        "provider",
        Column("base URL", overflow="fold"),
        Column("proxy", overflow="fold"),
        "status",
        "latency",
        "models",
        "problem",
    )
    for p, r in zip(providers, results, strict=True):
        status = "[green]ok[/]" if r.ok else "[red]failed[/]"
        if r.status is not None:
            status += f" ({r.status})"
        table.add_row(
            escape(p.name),
            escape(shown_url(p)),
            escape(_shown_proxy(p)),
            status,
            f"{r.latency_ms:.0f} ms",
            str(len(r.models)) if r.ok else "-",
            escape(r.error or ""),
        )
    return table


def shown_url(provider: Provider) -> str:
    """The provider's base URL without credentials."""
    url = public_url(provider.base_url)
    return url.replace(provider.secret, "***") if provider.secret else url


def _shown_proxy(provider: Provider) -> str:
    if not provider.proxy:
        return "-"
    shown = public_url(provider.proxy)
    return shown if provider.config.proxy else f"{shown} (environment)"


def model_warnings(cfg: GatewayConfig, results: Mapping[str, ProbeResult]) -> list[str]:
    """Models whose deployments point at failed providers or at models not listed there."""
    lines = []
    for m in cfg.models:
        down = sorted({d.provider for d in m.deployments if not results[d.provider].ok})
        if down and all(d.provider in down for d in m.deployments):
            lines.append(f"model {m.name}: no reachable deployment ({', '.join(down)} failed)")
        elif down:
            lines.append(f"model {m.name}: deployments on {', '.join(down)} are unreachable")
        for d in m.deployments:
            listed = results[d.provider].models
            upstream = d.model or (None if "*" in m.name else m.name)
            if upstream and listed and upstream not in listed:
                lines.append(f"model {m.name}: {d.provider} does not list {upstream!r}")
    return lines


async def _database_prices(cfg: GatewayConfig) -> PriceBook | None:
    """Every price the gateway would use (shipped, configured, set in the database), or None
    when the database cannot be read (then only the first two are checked)."""
    if not cfg.accounting.enabled:
        return None
    url = database_url(cfg)
    file = make_url(url).database
    if url.startswith("sqlite") and not (file and Path(file).exists()):
        return None  # not created yet: do not create it here
    db = Database(url)
    try:
        return PriceBook(cfg.accounting.prices, await load_overrides(db.engine))
    except Exception:  # no database yet, unreachable, not migrated: said in the warning
        return None
    finally:
        await db.close()


def price_warnings(cfg: GatewayConfig, book: PriceBook | None) -> list[str]:
    """Models that would be metered at $0 because no price is known for them."""
    if not cfg.accounting.enabled:
        return []
    where = "shipped table, configuration or database"
    if book is None:
        book = PriceBook(cfg.accounting.prices)
        where = "shipped table or configuration (no database to check)"
    deployments: list[tuple[str, str | None]] = []
    for m in cfg.models:
        if "*" not in m.name:
            deployments += [(m.name, d.model) for d in m.deployments] or [(m.name, None)]
    return [
        f"model {name}: no price in the {where}; metered at $0 "
        f"(set accounting.prices.{name}, 0 for a model you host)"
        for name in book.unpriced(deployments)
    ]
