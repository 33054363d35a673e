"""Error classes and the exit codes they map to.

Every user mistake raises a subclass of `LiftqError` carrying a one-line message that names
the bad value and the fix. The CLI turns it into that line on stderr and the class's exit
code; nothing else in the package prints or exits.

Exit codes (stable, documented for CI jobs):
    0  ok
    1  internal error (a bug: please report it)
    2  bad input: a wrong path, unknown model or dataset, invalid option or corrupt file
    3  does not fit: no configuration fits the memory budget
    4  resource failure: network, hub, disk or memory
"""

from __future__ import annotations


class LiftqError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code = 1


class BadInputError(LiftqError):
    """The user gave a value that cannot work; the message says which and how to fix it."""

    exit_code = 2


class DoesNotFitError(LiftqError):
    """No configuration fits the requested memory budget."""

    exit_code = 3


class ResourceError(LiftqError):
    """A network, hub, disk or memory failure outside the user's arguments."""

    exit_code = 4


EXIT_CODES = {
    "ok": 0,
    "internal": LiftqError.exit_code,
    "bad_input": BadInputError.exit_code,
    "does_not_fit": DoesNotFitError.exit_code,
    "resource": ResourceError.exit_code,
}
