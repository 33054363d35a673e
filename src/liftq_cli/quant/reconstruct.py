"""Signs -> weight: the one place a quantized linear's weight is reconstructed.

    W = diag(s) Q blockdiag(M^T) T^-1      (cut to in_features before unwhitening)

Q holds the {-1,+1} codes of every d-slice of a row ([out, slices, D]), M the lattice matrix
[d, D], s the row scales and T the whitening transform (quant/whitening.py). The encoder's
output, block correction's straight-through signs, fine-tuning and the packed runtime's
`dequantize` all call `reconstruct`, so they compute the same weight from the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.whitening import Whitening, unwhiten_weight


def reconstruct(
    signs: torch.Tensor, matrix: torch.Tensor, scale: torch.Tensor, whitening: Whitening
) -> torch.Tensor:
    """The weight [out, in] (float32, differentiable in every argument).

    signs: {-1,+1} float [out, slices, D]; matrix: [d, D]; scale: [out]; whitening: factors
    of an in-dim T (in = whitening.in_features <= slices * d; the padding is cut off).
    """
    slices = signs @ matrix.T  # [out, slices, d]
    flat = slices.reshape(slices.shape[0], -1)[:, : whitening.in_features]
    return unwhiten_weight(flat * scale.unsqueeze(1), whitening)


@dataclass
class QuantizedLinear:
    """A quantised linear layer: sign codes, row scales, whitening factors and the lattice M."""

    cfg: LatticeConfig
    in_features: int
    codes: torch.Tensor  # bool [out, n_slices, D], True = +1
    scale: torch.Tensor  # float32 [out]
    whitening: Whitening
    matrix: torch.Tensor  # float32 [d, D]
    # the encoder's per-bit flip margins (quant/encode.py flip_margins); not stored
    margin: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    def signs(self) -> torch.Tensor:
        return self.codes.float() * 2 - 1

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, float32 [out, in]."""
        return reconstruct(self.signs(), self.matrix, self.scale, self.whitening)

    def state(self) -> dict[str, torch.Tensor]:
        """codes (bool), scale, s1, p1, p2, s2: what the work dir and the output store."""
        return {"codes": self.codes.contiguous(), "scale": self.scale, **self.whitening.state()}

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], cfg: LatticeConfig, matrix: torch.Tensor
    ) -> QuantizedLinear:
        wh = Whitening.from_state(state)
        return cls(cfg, wh.in_features, state["codes"].bool(), state["scale"], wh, matrix)
