"""Bit allocation: one allocator for `liftq plan --mixed` and `liftq quantize --mixed`.

Every item (a linear, or a group of identical linears) takes one of a list of candidate
lattice configs; candidate j costs cost[item][j] (bits or bytes) and adds loss[item][j] to a
predicted distortion. `choose` minimises the total loss with the total cost within a budget:

* Lagrangian relaxation: for a price lam per unit of cost every item takes
  argmin_j loss + lam * cost over its lower convex hull; lam is bisected to the smallest
  price that fits.
* The budget that price leaves unspent is then filled greedily, best loss drop per extra unit
  of cost first, so the result is never worse than the relaxation's point.

The callers differ only in their tables:

* `allocate` (quantize --mixed): cost = packed code bits of the linear (padding to whole
  d-slices included), loss = kappa_l * mse_c, kappa the measured empirical-Fisher sensitivity
  (quant/sensitivity.py) and mse_c the lattice's Gaussian MSE per dimension: a linear l
  quantised with lattice c adds about kappa_l * mse_c / 2 to the calibration loss.
* `plan/solver.plan_mixed`: cost = packed bytes of a group of linears, loss = prior weight x
  parameters x 2^(-2 bits) (the rate-distortion slope of a Gaussian source).

Pure functions of plain numbers; deterministic (ties break on the candidate order).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig

Key = Hashable


def choose(
    cost: Mapping[Key, Sequence[float]],
    loss: Mapping[Key, Sequence[float]],
    budget: float,
    start: Mapping[Key, int] | None = None,
) -> dict[Key, int] | None:
    """A candidate index per item minimising sum(loss) with sum(cost) <= budget.

    cost, loss: item -> one value per candidate (same candidates for every item, same keys in
    both). start: a feasible choice to fill greedily from instead of the relaxation's point
    (only upgrades follow). Returns None when even the cheapest candidates exceed the budget.
    """
    keys = list(cost)
    hulls = {k: _hull(cost[k], loss[k]) for k in keys}
    if sum(cost[k][hulls[k][0]] for k in keys) > budget:
        return None

    def pick(lam: float) -> dict[Key, int]:
        return {k: min(hulls[k], key=lambda j, k=k: loss[k][j] + lam * cost[k][j]) for k in keys}

    def spent(choice: Mapping[Key, int]) -> float:
        return sum(cost[k][j] for k, j in choice.items())

    if start is None:
        low, high = 0.0, 1.0
        while spent(pick(high)) > budget:
            high *= 4
        for _ in range(100):  # bisect the price: low overspends, high fits
            mid = (low + high) / 2
            if spent(pick(mid)) > budget:
                low = mid
            else:
                high = mid
        choice = pick(high)
    else:
        choice = dict(start)
    left = budget - spent(choice)
    while True:  # fill the rest: best loss drop per extra unit among upgrades that fit
        best = None
        for k in keys:
            j = choice[k]
            for up in hulls[k]:
                extra = cost[k][up] - cost[k][j]
                drop = loss[k][j] - loss[k][up]
                if extra > 0 and drop > 0 and extra <= left:
                    rate = drop / extra
                    if best is None or rate > best[0]:
                        best = (rate, k, up, extra)
        if best is None:
            break
        _, k, up, extra = best
        choice[k] = up
        left -= extra
    return choice


@dataclass(frozen=True)
class Allocation:
    """Per-linear configs plus what they cost and are predicted to do."""

    configs: dict[Hashable, LatticeConfig]
    code_bits: float  # packed code bits per weight (padding included)
    predicted: float  # sum_l kappa_l mse_c, relative units
    uniform_predicted: float  # the same for the uniform config at target_bits (0 if none)


def code_bits(shape: tuple[int, int], cfg: LatticeConfig) -> int:
    """Packed sign bits of an (out, in) linear at `cfg`: out * ceil(in / d) * D."""
    out, n_in = shape
    return out * math.ceil(n_in / cfg.d) * cfg.D


def allocate(
    shapes: Mapping[Hashable, tuple[int, int]],
    sensitivity: Mapping[Hashable, float],
    mse: Mapping[LatticeConfig, float],
    target_bits: float,
    uniform: LatticeConfig | None = None,
) -> Allocation:
    """Choose a config from `mse` (config -> Gaussian MSE) for every linear in `shapes`.

    shapes: key -> (out, in); sensitivity: key -> kappa >= 0 (same keys). The packed code
    bits of all linears stay within target_bits * total weights. `uniform` is only reported
    against (its predicted distortion). Raises BadInputError when even the cheapest config
    everywhere exceeds the budget.
    """
    if set(shapes) != set(sensitivity):
        raise BadInputError("sensitivity must cover exactly the linears being allocated")
    configs = sorted(mse, key=lambda c: (c.bits, -c.d))
    keys = list(shapes)
    budget = target_bits * sum(o * i for o, i in shapes.values())
    cost = {k: [code_bits(shapes[k], c) for c in configs] for k in keys}
    loss = {k: [max(sensitivity[k], 0.0) * mse[c] for c in configs] for k in keys}
    choice = choose(cost, loss, budget)
    if choice is None:
        cheapest = configs[0]
        raise BadInputError(
            f"--bits {target_bits} is below what the cheapest lattice ({cheapest.name}) needs "
            f"with padding: ask for at least {cheapest.bits:.1f} bits"
        )
    total = sum(o * i for o, i in shapes.values())
    uniform_predicted = (
        sum(max(sensitivity[k], 0.0) for k in keys) * mse[uniform] if uniform in mse else 0.0
    )
    return Allocation(
        configs={k: configs[j] for k, j in choice.items()},
        code_bits=sum(cost[k][j] for k, j in choice.items()) / total,
        predicted=sum(loss[k][j] for k, j in choice.items()),
        uniform_predicted=uniform_predicted,
    )


def _hull(cost: Sequence[float], loss: Sequence[float]) -> list[int]:
    """Indices on the lower-left convex hull of the points (cost, loss), by rising cost."""
    order = sorted(range(len(cost)), key=lambda j: (cost[j], loss[j]))
    frontier: list[int] = []
    for j in order:  # Pareto: strictly lower loss than everything cheaper
        if not frontier or loss[j] < loss[frontier[-1]]:
            if frontier and cost[j] == cost[frontier[-1]]:
                frontier.pop()
            frontier.append(j)
    hull: list[int] = []
    for j in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the segment a -> j
            cross = (cost[b] - cost[a]) * (loss[j] - loss[a]) - (loss[b] - loss[a]) * (
                cost[j] - cost[a]
            )
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(j)
    return hull
