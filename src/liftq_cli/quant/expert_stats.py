"""Calibration statistics of a block whose experts calibration may not reach.

Each expert's linears are measured on the tokens routed to it (quant/experts.py runs
every expert every batch, on zero tokens or more). An expert no calibration token was
routed to would have no Gram matrix at all; its stated fallback is a second pass over the
same windows in which it receives every token of the layer (its outputs are discarded, so
the block computes as before): the Gram of all tokens, the most an unseen expert can be
told. The block report counts such experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from liftq_cli.quant.exchange import gram_stats, linear_kinds
from liftq_cli.quant.experts import expert_lists
from liftq_cli.quant.parallel import Team
from liftq_cli.quant.stats import Reference

Stats = dict[str, tuple[torch.Tensor, ...]]


def block_stats(
    block: nn.Module,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    team: Team,
    owner: dict[str, int],
    linears: dict[str, nn.Linear] | None = None,
    reference: Reference | None = None,
) -> tuple[Stats, frozenset[str]]:
    """`gram_stats` of every linear `owner` gives this rank among `linears` (default: all of
    the block's), and the experts that took the all-token fallback ('mlp.experts.3.'; the
    same on every rank: token counts are summed over ranks before anyone decides).
    reference: see `gram_stats` (routed experts are never measured against it)."""
    stats, tokens = gram_stats(block, run, inputs, team, owner, linears, reference)
    lists = expert_lists(block)

    def unseen(path: str, expert: int) -> bool:
        counts = [c for n, c in tokens.items() if n.startswith(f"{path}.{expert}.")]
        return bool(counts) and not any(counts)

    idle = {
        path: frozenset(e for e in range(len(experts)) if unseen(path, e))
        for path, experts in lists.items()
    }
    idle = {path: gaps for path, gaps in idle.items() if gaps}
    if not idle:
        return stats, frozenset()
    prefixes = tuple(f"{path}.{e}." for path, gaps in idle.items() for e in gaps)
    measured = linear_kinds(block) if linears is None else linears
    linears = {n: m for n, m in measured.items() if n.startswith(prefixes)}
    try:
        for path, gaps in idle.items():
            lists[path].route_all = gaps
        extra, _ = gram_stats(block, run, inputs, team, owner, linears)
    finally:
        for path in idle:
            lists[path].route_all = frozenset()
    stats.update(extra)
    return stats, frozenset(prefixes)
