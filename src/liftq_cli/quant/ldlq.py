"""LDLQ: encode a weight's d-slices with Hessian error feedback (as in GPTQ and QuIP#).

In the whitened basis the output error of E' = W T - Q' is tr(E' H' E'^T) with
H' = T^-1 H T^-T (H: the layer's calibration Gram matrix X^T X). Slices are encoded one
d-column block at a time, and each block's error is pushed onto the columns not yet encoded
through the Cholesky factor of H'^-1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from liftq_cli.quant.whitening import Whitening, lift_activation

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_codes(signs: torch.Tensor) -> torch.Tensor:
    """An encoder's output as bool codes (True = +1): encoders return bool or +-1 floats."""
    return signs if signs.dtype == torch.bool else signs > 0


def whitened_hessian(gram: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """H' = T^-1 H T^-T (float64 [n, n]): the output-error metric in the whitened basis."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    lift = lift_activation(eye, _as64(wh))  # T^-T
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
    decode = matrix.to(target.device, torch.float64).T
    codes = []
    for start in range(0, n, d):
        stop = min(start + d, n)
        block = torch.zeros(out, d, dtype=torch.float64, device=target.device)
        block[:, : stop - start] = work[:, start:stop]
        signs = as_codes(encode(block.float().unsqueeze(1), matrix)[:, 0])
        codes.append(signs)
        if stop < n:
            decoded = (signs.double() * 2 - 1) @ decode
            err = work[:, start:stop] - decoded[:, : stop - start]
            feedback = torch.linalg.solve_triangular(
                upper[start:stop, start:stop], upper[start:stop, stop:], upper=True
            )
            work[:, stop:] -= err @ feedback
    return torch.stack(codes, dim=1)
