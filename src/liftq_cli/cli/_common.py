"""Shared CLI plumbing: error mapping, JSON output, progress bars only on a terminal."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

from liftq_cli.errors import LiftqError
from liftq_cli.lattice_config import LatticeConfigError

F = TypeVar("F", bound=Callable[..., Any])


def _console(stderr: bool = False) -> Console:
    """A terminal gets its own width; a log or a pipe gets 120 columns ($COLUMNS overrides),
    not rich's 80, so tables in CI logs are not cut down to ellipses."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty() or os.environ.get("COLUMNS"):
        return Console(stderr=stderr)
    return Console(stderr=stderr, width=120)


console = _console()
err_console = _console(stderr=True)


def fail(exc: LiftqError | LatticeConfigError, as_json: bool = False) -> typer.Exit:
    """Print the one-line error (and a JSON object with --json); return the Exit to raise."""
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps({"error": message, "exit_code": exc.exit_code}))
    return typer.Exit(code=exc.exit_code)


def handle_errors(func: F) -> F:
    """Map `LiftqError` raised by a command to its exit code and a one-line message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (LiftqError, LatticeConfigError) as exc:
            raise fail(exc, bool(kwargs.get("as_json"))) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def emit_json(payload: dict[str, Any]) -> None:
    """Write one JSON object to stdout (machine-readable output of --json)."""
    print(json.dumps(payload, indent=2, sort_keys=False, default=str))


def interactive() -> bool:
    """True on a terminal outside CI: the only place progress bars are drawn."""
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """Yield `update(label, done, total)`; draws a rich bar when enabled, else does nothing."""
    if not enabled:
        yield lambda label, done, total: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, total=total)
            progress.update(tasks[label], completed=done, total=total)

        yield update
