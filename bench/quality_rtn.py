"""Round-to-nearest (RTN) baseline and the bits-per-weight accounting of the quality bench.

RTN is the floor every quantizer must beat: each row of a weight matrix is cut into groups
of `group_size` input columns (the last group may be shorter), and each group is mapped
affinely onto the integers 0 .. 2^b - 1 with its own min/max:

    s = (max - min) / (2^b - 1),  m = min   (both stored as fp16)
    q = clamp(round((w - m) / s), 0, 2^b - 1),   w_hat = q * s + m

The codes use b bits each (ideal packing); every group also stores s and m. So a weight
costs b + (scale_bits + zero_bits) / group_size bits on average, e.g. 4 + 32/128 = 4.25 for
4-bit groups of 128 (slightly more when a row length is not a multiple of the group).
Pure functions of tensors: no paths, no printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RtnConfig:
    """Asymmetric per-group min/max round-to-nearest with fp16 scale and zero."""

    bits: int
    group_size: int
    scale_bits: int = 16
    zero_bits: int = 16

    def __post_init__(self) -> None:
        assert 1 <= self.bits <= 8, self.bits
        assert self.group_size >= 1, self.group_size


@dataclass(frozen=True)
class RtnTensors:
    """Codes uint8 [out, in]; scale and zero fp16 [out, ceil(in / group_size)]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, groups, group_size]; a short last group is padded with its own last value
    (edge padding leaves every group's min and max unchanged)."""
    out_features, in_features = weight.shape
    groups = math.ceil(in_features / group_size)
    pad = groups * group_size - in_features
    w = weight.float()
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    return w.view(out_features, groups, group_size)


def rtn_quantize(weight: torch.Tensor, config: RtnConfig) -> RtnTensors:
    """Quantize a 2-D weight [out, in] (any float dtype) group-wise along the input dim."""
    assert weight.dim() == 2, weight.shape
    in_features = weight.shape[1]
    w = _grouped(weight, config.group_size)
    levels = 2**config.bits - 1
    low = w.amin(dim=2)
    high = w.amax(dim=2)
    # The stored fp16 values are the ones the decoder sees, so codes are computed from them.
    zero = low.to(torch.float16)
    scale = ((high - low) / levels).to(torch.float16)
    # A constant group has scale 0: any code decodes to the zero, so use scale 1 for division.
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((w - zero.float()[..., None]) / safe[..., None]).clamp_(0, levels)
    codes = codes.to(torch.uint8).view(w.shape[0], -1)[:, :in_features].contiguous()
    return RtnTensors(codes=codes, scale=scale, zero=zero, group_size=config.group_size)


def rtn_dequantize(tensors: RtnTensors) -> torch.Tensor:
    """float32 [out, in] weights decoded from codes, scale and zero."""
    out_features, in_features = tensors.codes.shape
    g = tensors.group_size
    index = torch.arange(in_features) // g
    scale = tensors.scale.float()[:, index]
    zero = tensors.zero.float()[:, index]
    return tensors.codes.float() * scale + zero


def rtn_roundtrip(weight: torch.Tensor, config: RtnConfig) -> torch.Tensor:
    """Quantize then decode: float32 weights of the same shape."""
    return rtn_dequantize(rtn_quantize(weight, config))


def rtn_storage_bits(shape: tuple[int, int], config: RtnConfig) -> int:
    """Bits needed to store one [out, in] matrix: packed codes plus per-group scale and zero."""
    out_features, in_features = shape
    groups = out_features * math.ceil(in_features / config.group_size)
    return out_features * in_features * config.bits + groups * (
        config.scale_bits + config.zero_bits
    )


def bits_per_weight(storage_bits: int, weights: int) -> float:
    """Effective bits per weight: every stored bit (codes, scales, zeros, padding) / weights."""
    assert weights > 0
    return storage_bits / weights
