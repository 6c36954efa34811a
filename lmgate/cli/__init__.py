"""The `lmgate` command line."""

from __future__ import annotations

import typer

from lmgate.cli import doctor, init, models, serve

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


@app.callback()
def _root() -> None:
    """lmgate: one OpenAI-compatible endpoint in front of every model a group uses."""


def main() -> None:
    """Entry point of the `lmgate` console script."""
    app()
