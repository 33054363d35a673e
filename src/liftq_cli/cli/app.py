"""Root Typer application: `liftq <command>`.

Each command lives in its own module with a `register(app)` function; only commands that
really work are registered here.
"""

from __future__ import annotations

import typer

from liftq_cli.cli import eval as eval_cmd
from liftq_cli.cli import lattice as lattice_cmd
from liftq_cli.cli import pack as pack_cmd
from liftq_cli.cli import plan as plan_cmd
from liftq_cli.cli import push as push_cmd
from liftq_cli.cli import quantize as quantize_cmd
from liftq_cli.version import __version__

app = typer.Typer(
    name="liftq",
    help="Compress LLMs to any fractional bit-width (LiftQuant) so they fit your GPU exactly.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"liftq {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """liftq: plan, quantize, pack, evaluate and publish LiftQuant models."""


for module in (eval_cmd, lattice_cmd, pack_cmd, plan_cmd, push_cmd, quantize_cmd):
    module.register(app)


def main() -> None:
    app()
