"""Quantise one linear layer: whiten, cut rows into d-slices, lattice-encode, fit row scales.

    W T ~= diag(s) Q blockdiag(M^T),     Q in {-1,+1}^(out x n_slices*D)

Each whitened row is normalised to unit RMS so its d-slices look like N(0, I_d) samples (the
source M was trained on), padded with zeros to a multiple of d, encoded, and given the
least-squares row scale s over its real (unpadded) coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.whitening import Whitening, unwhiten_weight, whiten_weight

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class QuantizedLinear:
    """A quantised linear layer: sign codes, row scales, whitening factors and the lattice M."""

    cfg: LatticeConfig
    in_features: int
    codes: torch.Tensor  # bool [out, n_slices, D], True = +1
    scale: torch.Tensor  # float32 [out]
    whitening: Whitening
    matrix: torch.Tensor  # float32 [d, D]

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def signs(self) -> torch.Tensor:
        return self.codes.float() * 2 - 1

    def whitened(self) -> torch.Tensor:
        """diag(s) Q blockdiag(M^T), cut back to in_features: float32 [out, in]."""
        slices = self.signs() @ self.matrix.T  # [out, n_slices, d]
        flat = slices.reshape(self.out_features, -1)[:, : self.in_features]
        return flat * self.scale.unsqueeze(1)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, float32 [out, in]."""
        return unwhiten_weight(self.whitened(), self.whitening)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        state = {f"{prefix}codes": self.codes.contiguous(), f"{prefix}scale": self.scale}
        state.update(self.whitening.state(prefix))
        return state

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], prefix: str, cfg: LatticeConfig, matrix: torch.Tensor
    ) -> QuantizedLinear:
        wh = Whitening.from_state(state, prefix)
        return cls(
            cfg, wh.in_features, state[f"{prefix}codes"].bool(), state[f"{prefix}scale"], wh, matrix
        )


def slice_rows(rows: torch.Tensor, d: int) -> torch.Tensor:
    """[out, n] -> [out, ceil(n/d), d], zero-padded."""
    out, n = rows.shape
    n_slices = math.ceil(n / d)
    padded = torch.zeros(out, n_slices * d, dtype=rows.dtype)
    padded[:, :n] = rows
    return padded.view(out, n_slices, d)


def row_scales(whitened: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """Least-squares scale per row: argmin_s ||w - s a||^2 = <w, a> / <a, a>."""
    return (whitened * approx).sum(1) / approx.pow(2).sum(1).clamp_min(1e-12)


def quantize_linear(
    weight: torch.Tensor,
    whitening: Whitening,
    cfg: LatticeConfig,
    matrix: torch.Tensor,
    encode: Encoder,
) -> QuantizedLinear:
    """Encode weight [out, in] (float32) with lattice `cfg` (M: [d, D]) after whitening."""
    whitened = whiten_weight(weight.float(), whitening)
    rms = whitened.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    slices = slice_rows(whitened / rms, cfg.d)
    signs = encode(slices, matrix)
    codes = signs > 0 if signs.dtype != torch.bool else signs
    approx = ((codes.float() * 2 - 1) @ matrix.T).reshape(weight.shape[0], -1)
    approx = approx[:, : weight.shape[1]]
    scale = row_scales(whitened, approx)
    return QuantizedLinear(cfg, weight.shape[1], codes, scale.float(), whitening, matrix.float())
