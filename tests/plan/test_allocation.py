"""Sensitivity-aware allocation: the budget holds, sensitive linears get more bits, and the
result is as good as an exhaustive search on small instances."""

from __future__ import annotations

import itertools
import random

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.allocation import allocate, code_bits

# Gaussian-like MSE curve (2^-2b) on a d=8 ladder: in_features 640 pad to nothing at d=8, 10.
LADDER = {LatticeConfig(D, 8): 2.0 ** (-2 * D / 8) for D in (16, 20, 24, 28, 32)}


def test_code_bits_count_padding_to_whole_slices():
    assert code_bits((4, 576), LatticeConfig(30, 10)) == 4 * 58 * 30  # 576 -> 580 columns
    assert code_bits((4, 576), LatticeConfig(24, 8)) == 4 * 576 * 3


def test_equal_linears_get_the_uniform_config():
    shapes = {i: (64, 640) for i in range(6)}
    result = allocate(shapes, dict.fromkeys(shapes, 1.0), LADDER, 3.0, LatticeConfig(24, 8))
    assert set(result.configs.values()) == {LatticeConfig(24, 8)}
    assert result.code_bits == pytest.approx(3.0)
    assert result.predicted == pytest.approx(result.uniform_predicted)


def test_sensitive_linears_get_more_bits_within_the_budget():
    shapes = {i: (64, 640) for i in range(8)}
    sensitivity = {i: 1.0 for i in shapes} | {0: 64.0, 1: 16.0}
    result = allocate(shapes, sensitivity, LADDER, 3.0, LatticeConfig(24, 8))
    bits = {k: c.bits for k, c in result.configs.items()}
    # both capped at the top rung; the six others pay for them (2 bits over 6 linears)
    assert bits[0] == bits[1] == 4.0
    assert sum(bits[k] for k in range(2, 8)) == pytest.approx(6 * 3.0 - 2.0)
    assert result.code_bits <= 3.0 + 1e-12
    spent = sum(code_bits(shapes[k], c) for k, c in result.configs.items())
    assert spent <= 3.0 * 8 * 64 * 640
    # with 2^-2b distortion the optimum moves half a bit per factor 2 of sensitivity
    assert result.predicted < 0.6 * result.uniform_predicted


@pytest.mark.parametrize("seed", range(6))
def test_close_to_the_exhaustive_optimum(seed):
    rng = random.Random(seed)
    shapes = {i: (rng.choice([16, 32, 64]), 640) for i in range(5)}
    sensitivity = {i: rng.lognormvariate(0, 1.5) for i in shapes}
    target = rng.uniform(2.3, 3.7)
    result = allocate(shapes, sensitivity, LADDER, target)
    budget = target * sum(o * i for o, i in shapes.values())
    best = min(
        sum(sensitivity[k] * LADDER[c] for k, c in zip(shapes, choice, strict=True))
        for choice in itertools.product(LADDER, repeat=len(shapes))
        if sum(code_bits(shapes[k], c) for k, c in zip(shapes, choice, strict=True)) <= budget
    )
    assert result.code_bits <= target + 1e-12
    assert best <= result.predicted <= 1.25 * best


def test_deterministic():
    shapes = {i: (32, 640) for i in range(10)}
    sensitivity = {i: float(1 + i % 3) for i in shapes}
    first = allocate(shapes, sensitivity, LADDER, 2.7)
    assert allocate(shapes, sensitivity, LADDER, 2.7) == first


def test_a_budget_below_the_cheapest_config_is_refused():
    shapes = {0: (16, 640)}
    with pytest.raises(BadInputError, match="--bits 1.5"):
        allocate(shapes, {0: 1.0}, LADDER, 1.5)


def test_sensitivity_must_cover_every_linear():
    with pytest.raises(BadInputError, match="sensitivity"):
        allocate({0: (16, 640), 1: (16, 640)}, {0: 1.0}, LADDER, 3.0)
