"""Quantise one linear layer: whiten, cut rows into d-slices, lattice-encode, fit row scales.

    W T ~= diag(s) Q blockdiag(M^T),     Q in {-1,+1}^(out x n_slices*D)

Each whitened row is normalised to unit RMS so its d-slices look like N(0, I_d) samples (the
source M was trained on), padded with zeros to a multiple of d, encoded, and given the
least-squares row scale s over its real (unpadded) coordinates. With the layer's calibration
Gram matrix the slices are encoded with LDLQ error feedback (quant/ldlq.py) and the row scales
are the H'-weighted least-squares ones.
"""

from __future__ import annotations

import math

import torch

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.ldlq import Encoder, as_codes, ldlq_encode, whitened_hessian
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quant.whitening import Whitening, whiten_weight


def slice_rows(rows: torch.Tensor, d: int) -> torch.Tensor:
    """[out, n] -> [out, ceil(n/d), d], zero-padded."""
    out, n = rows.shape
    n_slices = math.ceil(n / d)
    padded = torch.zeros(out, n_slices * d, dtype=rows.dtype, device=rows.device)
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
    Computes on weight's device; `matrix` may stay on the CPU (the encoder caches its search
    plan per matrix and device without a device sync).
    """
    whitened = whiten_weight(weight.float(), whitening)
    rms = whitened.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
    if gram is None:
        metric = None
        codes = as_codes(encode(slice_rows(whitened / rms, cfg.d), matrix))
    else:
        hessian = whitened_hessian(gram, whitening)
        metric = hessian.float()
        codes = ldlq_encode(whitened / rms, hessian, matrix, encode)
    decode = matrix.to(weight.device, torch.float32)
    approx = ((codes.float() * 2 - 1) @ decode.T).reshape(weight.shape[0], -1)
    approx = approx[:, : weight.shape[1]]
    scale = row_scales(whitened, approx, metric)
    quant = QuantizedLinear(cfg, weight.shape[1], codes, scale.float(), whitening, decode)
    quant.margin = flip_margins(quant, whitened, metric)
    return quant


def flip_margins(
    quant: QuantizedLinear, whitened: torch.Tensor, metric: torch.Tensor | None
) -> torch.Tensor:
    """How sure each code bit is: the continuous pre-sign value of bit j, over its sign.

    With E = s Q M^T - W T the row error in the whitened basis and H' the output-error metric
    (identity without a Gram matrix), flipping bit j of slice k alone changes tr(E H' E^T) by
        4 s^2 c_kj (1 - q_j (E H')_k . m_j / (s c_kj)),      c_kj = m_j^T H'_kk m_j,
    and the Newton step of the relaxed code, q_j - g_j / c_kj, has the sign of q_j times the
    bracket. That bracket is returned (float32 [out, slices, D]): about 1 for a bit at its
    optimum, below 0 where the flip alone would lower the layer's output error. Block
    correction starts its code latents from it, so the least sure bits flip first.
    """
    out, slices, _ = quant.codes.shape
    d, n = quant.matrix.shape[0], quant.in_features
    matrix = quant.matrix.to(whitened.device, torch.float32)
    signs = quant.signs()
    approx = (signs @ matrix.T).reshape(out, -1)[:, :n] * quant.scale.unsqueeze(1)
    padded = torch.zeros(slices * d, slices * d, device=whitened.device)
    if metric is None:
        padded[:n, :n] = torch.eye(n, device=whitened.device)
    else:
        padded[:n, :n] = metric / metric.diagonal().mean().clamp_min(1e-12)
    grad = torch.zeros(out, slices * d, device=whitened.device)
    grad[:, :n] = (approx - whitened) @ padded[:n, :n]
    blocks = torch.diagonal(padded.view(slices, d, slices, d), dim1=0, dim2=2)  # [d, d, S]
    curvature = torch.einsum("abk,aj,bj->kj", blocks, matrix, matrix).clamp_min(1e-12)
    linear = grad.view(out, slices, d) @ matrix  # [out, S, D]: (E H')_k . m_j
    scale = quant.scale.view(-1, 1, 1)
    scale = torch.where(scale.abs() < 1e-12, torch.full_like(scale, 1e-12), scale)
    return 1 - signs * linear / (scale * curvature)
