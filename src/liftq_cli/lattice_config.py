"""Lattice configurations LQ-D/d: D sign bits describe a d-dim slice, so bits = D/d.

A leaf module: it imports nothing else of liftq, so the packed format, the planner, the
quantizer, the runtime and the hub can all name a config without importing each other.
`CATALOG_CONFIGS` is the list of configurations whose mapping matrices ship with the package;
the budget solver picks among them and the quantizer accepts any of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_D = 32  # sign codes of one slice must fit one 32-bit word in the packed format


class LatticeConfigError(ValueError):
    """An impossible or malformed LQ-D/d. Bad input (exit code 2), like
    `liftq_cli.errors.BadInputError`; defined here so that this module stays a leaf."""

    exit_code = 2


@dataclass(frozen=True, order=True)
class LatticeConfig:
    """A (D, d) pair: each d-dim slice is `M q` with `q` in {-1,+1}^D and `M` of shape (d, D)."""

    D: int
    d: int

    def __post_init__(self) -> None:
        if self.d < 1:
            raise LatticeConfigError(f"lattice d={self.d} is invalid: d must be at least 1")
        if self.d >= self.D:
            raise LatticeConfigError(
                f"lattice LQ-{self.D}/{self.d} is invalid: D must exceed d (bits = D/d > 1)"
            )
        if self.D > MAX_D:
            raise LatticeConfigError(
                f"lattice LQ-{self.D}/{self.d} is invalid: D must be at most {MAX_D}"
            )

    @property
    def bits(self) -> float:
        return self.D / self.d

    @property
    def name(self) -> str:
        return f"LQ-{self.D}/{self.d}"

    @classmethod
    def parse(cls, text: str) -> LatticeConfig:
        """Parse 'LQ-24/10', '24/10' or '24,10'."""
        match = re.fullmatch(r"\s*(?:LQ-)?(\d+)\s*[/,x]\s*(\d+)\s*", text, flags=re.IGNORECASE)
        if not match:
            raise LatticeConfigError(
                f"lattice config '{text}' is not of the form LQ-D/d (for example LQ-24/10)"
            )
        return cls(int(match.group(1)), int(match.group(2)))


def _catalog() -> tuple[LatticeConfig, ...]:
    # d = 10 gives every 0.1-bit step from 1.6 to 3.2 bits; the paper's named configs are added,
    # and d = 8 carries the ladder on to 4.0 bits in quarter steps (D <= 32), for the linears
    # that a sensitivity-aware allocation upgrades (plan/allocation.py).
    pairs = {(D, 10) for D in range(16, 33)}
    pairs |= {(16, 8), (32, 16), (30, 14), (24, 10), (20, 8), (25, 10), (24, 8), (32, 20)}
    pairs |= {(26, 8), (28, 8), (30, 8), (32, 8)}
    return tuple(sorted((LatticeConfig(D, d) for D, d in pairs), key=lambda c: (c.bits, -c.d)))


CATALOG_CONFIGS: tuple[LatticeConfig, ...] = _catalog()
