"""quant/job.py: the helpers of the job driver (the driver itself runs in tests/cli and in
tests/quant/test_job_digest.py)."""

from __future__ import annotations

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.job import config_for_bits
from liftq_cli.quant.linear_shapes import average_bits, check_overrides

SHAPES = {(0, "q_proj"): (64, 64), (0, "down_proj"): (64, 128), (1, "q_proj"): (64, 64)}


def test_bits_pick_the_nearest_catalog_config():
    assert config_for_bits(2.4) == LatticeConfig(24, 10)
    assert config_for_bits(3.0).bits == pytest.approx(3.0)
    # ties go to the lower Gaussian MSE in the catalog manifest
    assert config_for_bits(2.0) == LatticeConfig(32, 16)
    assert config_for_bits(2.5) == LatticeConfig(25, 10)
    assert config_for_bits(2.42) == LatticeConfig(24, 10)


@pytest.mark.parametrize("bits", [float("nan"), float("inf"), 0.5, 9.0])
def test_bits_without_a_config_are_refused(bits):
    with pytest.raises(BadInputError, match=f"--bits {bits}"):
        config_for_bits(bits)


def test_average_bits_weigh_each_linear_by_its_size():
    def config_for(layer, kind):
        return LatticeConfig(30, 10) if kind == "down_proj" else LatticeConfig(20, 10)

    total = 64 * 64 * 2 + 64 * 128
    assert average_bits(SHAPES, config_for) == round((3.0 * 64 * 128 + 2.0 * 64 * 128) / total, 6)


def test_overrides_must_name_linears_the_model_has():
    check_overrides({1: {"q_proj": LatticeConfig(30, 10)}}, SHAPES)
    with pytest.raises(BadInputError, match="layer 2 but the model has 2 layers"):
        check_overrides({2: {"q_proj": LatticeConfig(30, 10)}}, SHAPES)
    with pytest.raises(BadInputError, match="layers.1.down_proj"):
        check_overrides({1: {"down_proj": LatticeConfig(30, 10)}}, SHAPES)
