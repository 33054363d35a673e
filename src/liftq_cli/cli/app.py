"""Root Typer application: `liftq <command>`.

Each command lives in its own module with a `register(app)` function; only commands that
really work are registered here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click: its usage errors are not click's classes
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - an older typer on plain click
    from click import UsageError

from liftq_cli.cli import eval as eval_cmd
from liftq_cli.cli import lattice as lattice_cmd
from liftq_cli.cli import pack as pack_cmd
from liftq_cli.cli import plan as plan_cmd
from liftq_cli.cli import push as push_cmd
from liftq_cli.cli import quantize as quantize_cmd
from liftq_cli.cli._common import err_console
from liftq_cli.version import __version__


class LiftqGroup(TyperGroup):
    """The root command: a usage error (unknown option, a value of the wrong type, a missing
    argument) is one line on stderr, exit code 2, and with --json the same JSON object every
    other error prints on stdout, not click's box."""

    def main(self, args: Any = None, *rest: Any, standalone_mode: bool = True, **extra: Any):
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(argv, *rest, standalone_mode=False, **extra)
        except UsageError as exc:
            message = " ".join(exc.format_message().split())
            if exc.ctx is not None:
                message += f" (see `{exc.ctx.command_path} --help`)"
            err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            if "--json" in argv:
                print(json.dumps({"error": message, "exit_code": exc.exit_code}))
            return self._exit(exc.exit_code, standalone_mode)
        except typer.Abort:
            err_console.print("[bold red]interrupted[/]")
            return self._exit(130, standalone_mode)
        return self._exit(result if isinstance(result, int) else 0, standalone_mode)

    @staticmethod
    def _exit(code: int, standalone_mode: bool) -> int:
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=LiftqGroup,
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
