"""`lmgate db`, `lmgate users` and `lmgate teams`: administration straight on the database."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from lmgate.cli.serve import ConfigOption, load_or_exit
from lmgate.config.schema import GatewayConfig
from lmgate.storage import users as store
from lmgate.storage.db import Database, database_url
from lmgate.storage.errors import StorageError

T = TypeVar("T")
DEFAULT_CONFIG = Path("lmgate.yaml")
console = Console()

db_app = typer.Typer(help="The database: migrations.", no_args_is_help=True)
users_app = typer.Typer(help="Users: the people and services that own keys.", no_args_is_help=True)
teams_app = typer.Typer(
    help="Teams: groups of users that can share a budget.", no_args_is_help=True
)


def cli_config(path: Path | None) -> GatewayConfig:
    """--config, else ./lmgate.yaml if present, else the defaults (lmgate.db in the cwd)."""
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_or_exit(path) if path is not None else GatewayConfig()


def on_db(config: Path | None, action: Callable[[Database], Awaitable[T]]) -> T:
    """Migrate the configured database, run `action` on it, and turn errors into messages."""
    db = Database(database_url(cli_config(config)))

    async def main() -> T:
        try:
            await db.upgrade()
            return await action(db)
        finally:
            await db.close()

    with cli_errors(db.safe_url):
        return asyncio.run(main())


@contextmanager
def cli_errors(where: str = "") -> Iterator[None]:
    """Turn storage and database errors into a one-line message and exit status 1."""
    try:
        yield
    except StorageError as e:
        typer.echo(f"error: {e.message}", err=True)
        raise typer.Exit(1) from None
    except (DBAPIError, OSError) as e:
        typer.echo(f"error: database {where}: {e}", err=True)
        raise typer.Exit(1) from None


def when(dt: datetime | None) -> str:
    """A UTC time for tables, to the minute; `-` for none."""
    return dt.strftime("%Y-%m-%d %H:%M") if dt else "-"


def table(*columns: str) -> Table:
    """A rich table with these column headers."""
    return Table(*columns, header_style="bold")


@db_app.command("upgrade")
def upgrade(config: ConfigOption = None) -> None:
    """Migrate the database to the newest schema (also done at start and by every command)."""
    url = on_db(config, _safe_url)
    typer.echo(f"database {url} is up to date")


async def _safe_url(db: Database) -> str:
    return db.safe_url


RoleOption = Annotated[str, typer.Option(help="admin or user.")]
TeamOption = Annotated[str | None, typer.Option(help="An existing team.")]


@users_app.command("add")
def users_add(
    name: str,
    email: Annotated[str | None, typer.Option(help="Contact address.")] = None,
    role: RoleOption = "user",
    team: TeamOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a user."""
    user = on_db(config, lambda db: store.create_user(db, name, email=email, role=role, team=team))
    typer.echo(f"created user {user.name}" + (f" in team {user.team}" if user.team else ""))


@users_app.command("list")
def users_list(team: TeamOption = None, config: ConfigOption = None) -> None:
    """List users."""
    rows = on_db(config, lambda db: store.list_users(db, team))
    t = table("name", "email", "role", "team", "disabled", "created (UTC)")
    for u in rows:
        t.add_row(
            escape(u.name),
            escape(u.email or "-"),
            u.role,
            escape(u.team or "-"),
            "yes" if u.disabled else "",
            when(u.created_at),
        )
    console.print(t)


@users_app.command("delete")
def users_delete(name: str, config: ConfigOption = None) -> None:
    """Delete a user and its keys (the ledger keeps its records)."""
    on_db(config, lambda db: store.delete_user(db, name))
    typer.echo(f"deleted user {name}")


@teams_app.command("add")
def teams_add(name: str, config: ConfigOption = None) -> None:
    """Create a team."""
    on_db(config, lambda db: store.create_team(db, name))
    typer.echo(f"created team {name}")


@teams_app.command("list")
def teams_list(config: ConfigOption = None) -> None:
    """List teams and their member counts."""
    rows = on_db(config, store.list_teams)
    t = table("name", "members", "created (UTC)")
    for team in rows:
        t.add_row(escape(team.name), str(team.members), when(team.created_at))
    console.print(t)
