"""Quantise one linear layer: whiten, cut rows into d-slices, lattice-encode, fit row scales.

    W T ~= diag(s) Q blockdiag(M^T),     Q in {-1,+1}^(out x n_slices*D)

Each whitened row is normalised to unit RMS so its d-slices look like N(0, I_d) samples (the
source M was trained on), padded with zeros to a multiple of d, encoded, and given the
least-squares row scale s over its real (unpadded) coordinates.

With the layer's calibration Gram matrix H the slices are encoded with error feedback (LDLQ,
as in GPTQ and QuIP#, one d-column block at a time): in the whitened basis the output error of
E' = W T - Q' is tr(E' H' E'^T) with H' = T^-1 H T^-T, so the error of each encoded block is
pushed onto the columns not yet encoded through the Cholesky factor of H'^-1, and the row
scales are the H'-weighted least-squares ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.whitening import (
    Whitening,
    lift_activation,
    unwhiten_weight,
    whiten_weight,
)

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


def row_scales(
    whitened: torch.Tensor, approx: torch.Tensor, metric: torch.Tensor | None = None
) -> torch.Tensor:
    """Least-squares scale per row: argmin_s ||w - s a||^2 = <w, a> / <a, a>, or with a
    metric H the H-weighted one, <w H, a> / <a H, a>."""
    if metric is None:
        return (whitened * approx).sum(1) / approx.pow(2).sum(1).clamp_min(1e-12)
    return ((whitened @ metric) * approx).sum(1) / ((approx @ metric) * approx).sum(1).clamp_min(
        1e-12
    )


def _as_codes(signs: torch.Tensor) -> torch.Tensor:
    """An encoder's output as bool codes (True = +1): encoders return bool or +-1 floats."""
    return signs if signs.dtype == torch.bool else signs > 0


def whitened_hessian(gram: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """H' = T^-1 H T^-T (float64 [n, n]): the output-error metric in the whitened basis."""
    lift = lift_activation(torch.eye(gram.shape[0], dtype=torch.float64), _as64(wh))  # T^-T
    return lift.T @ gram.double() @ lift


def _as64(wh: Whitening) -> Whitening:
    return Whitening(*(t.double() for t in (wh.s1, wh.p1, wh.p2, wh.s2)))


def ldlq_encode(
    target: torch.Tensor,
    hessian: torch.Tensor,
    matrix: torch.Tensor,
    encode: Encoder,
    damp: float = 0.01,
) -> torch.Tensor:
    """Encode rows of target [out, n] slice by slice with error feedback: bool [out, s, D].

    hessian: H' [n, n] in target's basis; `damp` * mean(diag) is added for stability.
    """
    out, n = target.shape
    d = matrix.shape[0]
    h = hessian.double().clone()
    h.diagonal().add_(damp * float(h.diagonal().mean().clamp_min(1e-12)))
    # H^-1 = U^T U with U upper triangular: the GPTQ/LDLQ feedback factor.
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work = target.double().clone()
    decode = matrix.double().T
    codes = []
    for start in range(0, n, d):
        stop = min(start + d, n)
        block = torch.zeros(out, d, dtype=torch.float64)
        block[:, : stop - start] = work[:, start:stop]
        signs = _as_codes(encode(block.float().unsqueeze(1), matrix)[:, 0])
        codes.append(signs)
        if stop < n:
            decoded = (signs.double() * 2 - 1) @ decode
            err = work[:, start:stop] - decoded[:, : stop - start]
            feedback = torch.linalg.solve_triangular(
                upper[start:stop, start:stop], upper[start:stop, stop:], upper=True
            )
            work[:, stop:] -= err @ feedback
    return torch.stack(codes, dim=1)


def quantize_linear(
    weight: torch.Tensor,
    whitening: Whitening,
    cfg: LatticeConfig,
    matrix: torch.Tensor,
    encode: Encoder,
    gram: torch.Tensor | None = None,
) -> QuantizedLinear:
    """Encode weight [out, in] (float32) with lattice `cfg` (M: [d, D]) after whitening.

    gram: the layer's calibration X^T X [in, in]; when given, slices are encoded with LDLQ
    error feedback and the row scales minimise the output error instead of the weight error.
    """
    whitened = whiten_weight(weight.float(), whitening)
    rms = whitened.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    if gram is None:
        metric = None
        codes = _as_codes(encode(slice_rows(whitened / rms, cfg.d), matrix))
    else:
        hessian = whitened_hessian(gram, whitening)
        metric = hessian.float()
        codes = ldlq_encode(whitened / rms, hessian, matrix, encode)
    approx = ((codes.float() * 2 - 1) @ matrix.T).reshape(weight.shape[0], -1)
    approx = approx[:, : weight.shape[1]]
    scale = row_scales(whitened, approx, metric)
    return QuantizedLinear(cfg, weight.shape[1], codes, scale.float(), whitening, matrix.float())
