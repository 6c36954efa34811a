"""`lmgate backends`: managed workers as the database shows them; start and stop a model.

The commands work through the database, not an HTTP API: the table is what the leader last
recorded (in flight and walltime are refreshed at every job poll), and `start`/`stop` leave a
request that the leading gateway carries out within `backends.follower_refresh` seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy import select

from lmgate.backends.models import BackendInstance, BackendModel
from lmgate.backends.state import BackendStore
from lmgate.cli.admin import cli_config, console, on_db, table
from lmgate.cli.serve import ConfigOption
from lmgate.storage.db import Database
from lmgate.storage.timeutil import maybe_utc, utcnow

backends_app = typer.Typer(
    help="Managed backends: workers launched as SLURM jobs or local processes.",
    invoke_without_command=True,
)
ModelArgument = Annotated[str, typer.Argument(help="A model with `backend:` in the config.")]


@backends_app.callback()
def backends(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Show every live worker: model, job id, state, node:port, in flight, age, walltime left."""
    if ctx.invoked_subcommand is not None:
        return
    instances, models = on_db(config, _load)
    out = table("model", "job id", "state", "node:port", "in flight", "age", "walltime left")
    now = utcnow()
    for row in instances:
        endpoint = f"{row.host}:{row.port}" if row.host else "-"
        end = maybe_utc(row.walltime_end)
        out.add_row(
            row.model,
            row.job_id or "-",
            row.state,
            endpoint,
            str(row.inflight),
            _span((now - (maybe_utc(row.submitted_at) or now)).total_seconds()),
            _span((end - now).total_seconds()) if end else "-",
        )
    for model in models:
        out.add_row(model.model, "-", "failed", "-", "-", "-", model.failed_reason or "")
    console.print(out)


@backends_app.command("start")
def start(model: ModelArgument, config: ConfigOption = None) -> None:
    """Start a worker for MODEL now (and forget a `failed` state)."""
    _check_model(config, model)
    on_db(config, lambda db: BackendStore(db).set_model(
        model, failed_reason=None, start_requested_at=utcnow()))  # fmt: skip
    typer.echo(f"start of {model} requested; the leading gateway launches a worker")


@backends_app.command("stop")
def stop(model: ModelArgument, config: ConfigOption = None) -> None:
    """Drain and stop every worker of MODEL (a later request starts it again)."""
    _check_model(config, model)
    on_db(config, lambda db: BackendStore(db).set_model(model, stop_requested_at=utcnow()))
    typer.echo(f"stop of {model} requested; the leading gateway drains its workers")


async def _load(db: Database) -> tuple[list[BackendInstance], list[BackendModel]]:
    async with db.session() as s:
        instances = await s.scalars(
            select(BackendInstance)
            .where(BackendInstance.state != "ended")
            .order_by(BackendInstance.model, BackendInstance.submitted_at)
        )
        failed = await s.scalars(
            select(BackendModel).where(BackendModel.failed_reason.is_not(None))
        )
        return list(instances), list(failed)


def _check_model(config: Path | None, model: str) -> None:
    managed = {m.name for m in cli_config(config).models if getattr(m, "backend", None)}
    if model not in managed:
        typer.echo(
            f"error: {model!r} is not a model with `backend:` in the configuration", err=True
        )
        raise typer.Exit(1)


def _span(seconds: float) -> str:
    """`42s`, `5m`, `3h12m`, `2d4h`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"
