"""Error-compensating targets: encode each linear toward what the full-precision model computes.

Inside the quantized model a linear sees x_q, not the full-precision model's x_f: every
linear before it (earlier blocks, and earlier stages of its own block, quant/stages.py) has
left its error there. Encoding W against its own input, min ||(Q - W) x_q||, keeps that error;
encoding toward the full-precision output,

    min_Q  E ||Q x_q - W x_f||^2  =  E ||(Q - W') x_q||^2 + const,
    W' = Y H^-1,   H = E[x_q x_q^T],   Y = E[y_f x_q^T] = W E[x_f x_q^T],

removes the part of it that is linear in x_q (asymmetric calibration, as in GPTAQ). So LDLQ
encodes W' with the same metric H, and nothing else changes (y_f = W x_f is the linear's
own output in the full-precision block, so Y is out x in: a Llama-3-70B down_proj's is a
quarter of its input's Gram). Y and H are estimated on the calibration windows, and W' fits
their particular errors as well as the general ones: a ridge pulls W' toward W,

    W' = (Y + lam W)(H + lam I)^-1,   lam = damp * mean diag(H),

the minimiser of E ||W' x_q - W x_f||^2 + lam ||W' - W||^2 (damp -> infinity gives W). On
SmolLM2-135M at 2.4 bits (64 x 512 calibration tokens, no correction) damp 0.01 over-fits:
block errors on the calibration windows halve, WikiText-2 perplexity rises; 0.1 lowers it
(bench/results/correction.md).
"""

from __future__ import annotations

import torch


def compensated_weight(
    weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float
) -> torch.Tensor:
    """W' = (Y + lam W)(H + lam I)^-1 with lam = damp * mean diag(H).

    weight: W [out, n]; gram: H = E[x_q x_q^T] [n, n]; cross: Y = E[y_f x_q^T] [out, n] (y_f
    = W x_f the linear's output in the full-precision model, x_q its input in the quantized
    one, on the same tokens). Solved in float64; returned in weight's dtype and device.
    """
    h = gram.double()
    lam = damp * float(h.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    factor = torch.linalg.cholesky(h + lam * eye)
    # W' (H + lam I) = Y + lam W  <=>  (H + lam I) W'^T = (Y + lam W)^T
    rhs = (cross.double() + lam * weight.double()).T
    return torch.cholesky_solve(rhs, factor).T.to(weight.dtype)
