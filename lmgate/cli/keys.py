"""`lmgate keys`, `lmgate budgets` and `lmgate usage`: keys, spending limits and reports."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from lmgate.cli.admin import cli_errors, console, on_db, table, when
from lmgate.cli.serve import ConfigOption
from lmgate.storage import budgets as budget_store
from lmgate.storage import keys as key_store
from lmgate.storage.reports import GROUPS, report_csv, usage_report
from lmgate.storage.timeutil import parse_duration, parse_time, utcnow

keys_app = typer.Typer(help="Virtual keys: create, list, revoke.", no_args_is_help=True)
budgets_app = typer.Typer(help="Budgets of keys, users and teams.", no_args_is_help=True)

PeriodOption = Annotated[str, typer.Option(help="day, week, month or total.")]


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option(help="The key's owner.")],
    name: Annotated[str, typer.Option(help="A label, e.g. the machine.")] = "",
    budget: Annotated[float | None, typer.Option(help="US dollars per period.")] = None,
    period: PeriodOption = "month",
    expires: Annotated[str | None, typer.Option(help="Lifetime: 30m, 12h, 180d, 2w.")] = None,
    models: Annotated[
        str | None, typer.Option(help="Allowed models, comma-separated; `*` patterns work.")
    ] = None,
    log_bodies: Annotated[bool, typer.Option(help="Keep request and response bodies.")] = False,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.", min=1)] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.", min=1)] = None,
    max_parallel: Annotated[
        int | None, typer.Option(help="Requests in flight at once.", min=1)
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Create a key and print its secret, once."""
    limits = {k: v for k, v in {"rpm": rpm, "tpm": tpm, "max_parallel": max_parallel}.items() if v}
    with cli_errors():
        expires_in = parse_duration(expires, "--expires") if expires else None
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    key, secret = on_db(
        config,
        lambda db: key_store.create_key(
            db,
            user,
            name=name,
            expires_in=expires_in,
            models=allowed,
            budget=(budget, period) if budget is not None else None,
            log_bodies=log_bodies,
            limits=limits,
        ),
    )
    typer.echo(f"created key {key.prefix} for {user}")
    typer.echo(secret)
    typer.echo("Copy it now: this secret is not stored and will not be shown again.", err=True)


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option(help="Only this user's keys.")] = None,
    all: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    config: ConfigOption = None,
) -> None:
    """List keys by prefix (secrets are never stored)."""
    rows = on_db(config, lambda db: key_store.list_keys(db, user, include_revoked=all))
    t = Table(header_style="bold")
    t.add_column("prefix", no_wrap=True)
    for column in ("name", "user", "status", "models", "expires", "last used"):
        t.add_column(column)
    for k in rows:
        t.add_row(
            k.prefix,
            escape(k.name),
            escape(k.user),
            k.status,
            escape(",".join(k.allowed_models or ["*"])),
            when(k.expires_at),
            when(k.last_used_at),
        )
    console.print(t)


@keys_app.command("revoke")
def keys_revoke(prefix: str, config: ConfigOption = None) -> None:
    """Revoke a key by its prefix; gateways refuse it within a second."""
    on_db(config, lambda db: key_store.revoke_key(db, prefix))
    typer.echo(f"revoked key {prefix}")


@budgets_app.command("set")
def budgets_set(
    amount: Annotated[float, typer.Option(help="US dollars per period.")],
    user: Annotated[str | None, typer.Option(help="A user's name.")] = None,
    team: Annotated[str | None, typer.Option(help="A team's name.")] = None,
    key: Annotated[str | None, typer.Option(help="A key's prefix.")] = None,
    period: PeriodOption = "month",
    config: ConfigOption = None,
) -> None:
    """Set the budget of one user, team or key."""
    targets = [(s, r) for s, r in (("user", user), ("team", team), ("key", key)) if r]
    if len(targets) != 1:
        typer.echo("error: give exactly one of --user, --team, --key", err=True)
        raise typer.Exit(2)
    scope, ref = targets[0]
    on_db(config, lambda db: budget_store.set_budget(db, scope, ref, amount, period))
    typer.echo(f"{scope} {ref}: budget ${amount:g} per {period}")


@budgets_app.command("list")
def budgets_list(config: ConfigOption = None) -> None:
    """List budgets."""
    rows = on_db(config, budget_store.list_budgets)
    t = table("scope", "name", "amount (USD)", "period")
    for b in rows:
        t.add_row(b.scope, escape(b.name), f"{b.amount:.2f}", b.period)
    console.print(t)


def usage(
    by: Annotated[str, typer.Option(help="user, team, key or model.")] = "user",
    since: Annotated[str, typer.Option(help="A duration ago (30d) or an ISO date.")] = "30d",
    until: Annotated[str | None, typer.Option(help="Exclusive end; default: now.")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="CSV instead of a table.")] = False,
    config: ConfigOption = None,
) -> None:
    """Requests, tokens and cost per user, team, key or model."""
    if by not in GROUPS:
        typer.echo(f"error: --by must be one of {', '.join(GROUPS)}", err=True)
        raise typer.Exit(2)
    now = utcnow()
    with cli_errors():
        start = parse_time(since, now, "--since")
        end = parse_time(until, now, "--until") if until else None
    rows = on_db(config, lambda db: usage_report(db, by, start, end))
    if csv:
        typer.echo(report_csv(rows), nl=False)
        return
    t = table(by, "requests", "prompt", "completion", "cached", "reasoning", "cost (USD)", "errors")
    for r in rows:
        label = f"{r.name} ({r.key_name})" if r.key_name else r.name
        counts = (r.requests, r.prompt_tokens, r.completion_tokens, r.cached_tokens)
        t.add_row(
            escape(label),
            *map(str, counts),
            str(r.reasoning_tokens),
            f"{r.cost:.4f}",
            str(r.errors),
        )
    console.print(t)
