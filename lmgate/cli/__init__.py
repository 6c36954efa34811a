"""The `lmgate` command line."""

from __future__ import annotations

import typer

from lmgate.backends.cli import backends_app
from lmgate.cli import admin, doctor, init, keys, models, serve

app = typer.Typer(
    name="lmgate",
    help="lmgate: one OpenAI-compatible endpoint in front of every model a group uses.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("serve")(serve.serve)
app.command("init")(init.init)
app.command("doctor")(doctor.doctor)
app.command("models")(models.models)
app.add_typer(admin.db_app, name="db")
app.add_typer(admin.users_app, name="users")
app.add_typer(admin.teams_app, name="teams")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(keys.budgets_app, name="budgets")
app.command("usage")(keys.usage)
app.add_typer(backends_app, name="backends")


@app.callback()
def _root() -> None:
    """lmgate: one OpenAI-compatible endpoint in front of every model a group uses."""


def main() -> None:
    """Entry point of the `lmgate` console script."""
    app()
