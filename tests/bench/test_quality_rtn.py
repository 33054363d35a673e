"""The quality bench's RTN floor: bits accounting, error bounds per bit-width, exact invariants."""

from __future__ import annotations

import pytest
import torch
from bench.quality_rtn import (
    RtnConfig,
    bits_per_weight,
    rtn_dequantize,
    rtn_quantize,
    rtn_roundtrip,
    rtn_storage_bits,
)


@pytest.mark.parametrize(
    ("bits", "group", "shape", "expected"),
    [
        (4, 128, (256, 1024), 4.25),  # 4 + (16 + 16) / 128
        (3, 64, (64, 512), 3.5),
        (2, 128, (32, 256), 2.25),
        (2, 64, (32, 256), 2.5),
        # 576 columns = 4.5 groups of 128: the short fifth group still pays a full scale + zero.
        (4, 128, (576, 576), 4 + 5 * 32 / 576),
    ],
)
def test_effective_bits_count_scales_and_zeros(bits, group, shape, expected):
    config = RtnConfig(bits=bits, group_size=group)
    storage = rtn_storage_bits(shape, config)
    assert bits_per_weight(storage, shape[0] * shape[1]) == pytest.approx(expected, abs=1e-12)


def test_stored_tensors_match_the_accounting():
    config = RtnConfig(bits=3, group_size=128)
    weight = torch.randn(48, 576, generator=torch.Generator().manual_seed(1))
    t = rtn_quantize(weight, config)
    assert t.codes.dtype == torch.uint8 and t.codes.shape == weight.shape
    assert t.scale.dtype == torch.float16 and t.scale.shape == (48, 5)
    assert t.zero.dtype == torch.float16 and t.zero.shape == (48, 5)
    assert int(t.codes.max()) <= 7
    stored = t.codes.numel() * config.bits + 16 * (t.scale.numel() + t.zero.numel())
    assert stored == rtn_storage_bits(tuple(weight.shape), config)


# Relative MSE bounds on a standard Gaussian for groups of 128: uniform noise s^2 / 12 with
# s ~ (range of 128 draws ~ 5.2 sigma) / (2^b - 1), plus 30 % headroom.
@pytest.mark.parametrize(("bits", "bound"), [(2, 0.33), (3, 0.06), (4, 0.013)])
def test_gaussian_error_per_bit_width(bits, bound):
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    config = RtnConfig(bits=bits, group_size=128)
    t = rtn_quantize(weight, config)
    approx = rtn_dequantize(t)
    rel_mse = float(((approx - weight) ** 2).mean() / (weight**2).mean())
    assert rel_mse < bound, rel_mse
    # Each element lies within half a step of its group (plus the fp16 rounding of s and m).
    step = t.scale.float().repeat_interleave(128, dim=1)
    slack = 1e-3 * (weight.abs().max() + step * (2**bits - 1))
    assert bool(((approx - weight).abs() <= step / 2 + slack).all())
    # More bits never hurt.
    if bits > 2:
        worse = rtn_roundtrip(weight, RtnConfig(bits=bits - 1, group_size=128))
        assert float(((worse - weight) ** 2).mean()) > float(((approx - weight) ** 2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_grid_points_roundtrip_bit_for_bit(bits):
    """Weights already on an fp16 grid (codes using both ends) come back exactly, codes too."""
    g, levels = 64, 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, levels + 1, (16, 200), generator=gen)
    codes[:, ::g] = 0  # every group (the short last one included) reaches 0 and the top
    codes[:, 1::g] = levels
    scale = torch.tensor([0.25, 0.125, 0.5, 0.0625]).repeat(4)[:, None].half()
    zero = (torch.arange(16) - 8).float()[:, None].half() / 4
    weight = codes.float() * scale.float() + zero.float()
    t = rtn_quantize(weight, RtnConfig(bits=bits, group_size=g))
    assert torch.equal(t.codes.long(), codes)
    assert torch.equal(rtn_dequantize(t), weight)


def test_constant_group_is_exact():
    weight = torch.full((4, 64), 0.375)
    assert torch.equal(rtn_roundtrip(weight, RtnConfig(bits=2, group_size=32)), weight)
