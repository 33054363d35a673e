"""Intra-block correction: train codes, row scales and whitening scales of a whole block.

Every quantised linear of a decoder block is replaced by a `CorrectableLinear` whose sign codes
live as a continuous latent L with q = sign(L) and a straight-through gradient (clipped to
|L| <= 1). Adam then minimises the MSE between the block's output and its full-precision
output on calibration inputs (paper appendix A). The lattice matrix M and the rotations P1,
P2 stay fixed, so the packed file still stores each M once; s1, s2 (the diagonal parts of the
fused decode transform T* = blockdiag(M)^T T^-1) and the row scales s are trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from liftq_cli.quant.reconstruct import QuantizedLinear, reconstruct
from liftq_cli.quant.whitening import Whitening
from liftq_cli.quantize_job import CorrectionConfig


def ste_sign(latent: torch.Tensor) -> torch.Tensor:
    """sign(L) forward; gradient 1 where |L| <= 1, else 0."""
    hard = torch.where(latent >= 0, 1.0, -1.0)
    soft = latent.clamp(-1.0, 1.0)
    return soft + (hard - soft).detach()


class CorrectableLinear(nn.Module):
    """A fake-quantised linear whose codes and scales can be trained through STE."""

    def __init__(self, quant: QuantizedLinear, bias: torch.Tensor | None, latent_init: float):
        super().__init__()
        self.cfg = quant.cfg
        self.in_features = quant.in_features
        self.latent = nn.Parameter(quant.signs() * latent_init)
        self.scale = nn.Parameter(quant.scale.clone())
        self.log_s1 = nn.Parameter(quant.whitening.s1.log().clone())
        self.log_s2 = nn.Parameter(quant.whitening.s2.log().clone())
        self.register_buffer("p1", quant.whitening.p1.clone())
        self.register_buffer("p2", quant.whitening.p2.clone())
        self.register_buffer("matrix", quant.matrix.clone())
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def whitening(self) -> Whitening:
        return Whitening(self.log_s1.exp(), self.p1, self.p2, self.log_s2.exp())

    def weight(self) -> torch.Tensor:
        """The fake-quantised weight. On a GPU, under autograd, its reconstruction is
        recomputed in the backward pass (activation checkpointing) rather than kept: the
        signs and the o x n intermediates of `reconstruct` would otherwise stay alive for
        every linear of the block at once (4 bytes a code bit + 16 bytes a weight), which is
        what a Llama-3-70B block needs to fit 80 GB. The values are the same either way; on
        the CPU, where memory is cheaper than the 25% longer correction, they are kept."""
        if not torch.is_grad_enabled() or not self.latent.is_cuda:
            return self._weight(self.latent, self.scale, self.log_s1, self.log_s2)
        return checkpoint(
            self._weight, self.latent, self.scale, self.log_s1, self.log_s2, use_reentrant=False
        )

    def _weight(self, latent, scale, log_s1, log_s2) -> torch.Tensor:
        whitening = Whitening(log_s1.exp(), self.p1, self.p2, log_s2.exp())
        return reconstruct(ste_sign(latent), self.matrix, scale, whitening)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)

    def export(self) -> QuantizedLinear:
        wh = self.whitening()
        return QuantizedLinear(
            self.cfg,
            self.in_features,
            (self.latent.detach() >= 0),
            self.scale.detach().clone(),
            Whitening(wh.s1.detach().clone(), self.p1, self.p2, wh.s2.detach().clone()),
            self.matrix,
        )


@dataclass
class CorrectionResult:
    mse_before: float
    mse_after: float
    flipped: float  # fraction of code bits changed


def correct_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    config: CorrectionConfig,
) -> CorrectionResult:
    """Train every `CorrectableLinear` inside `block` so run_block(block, inputs) ~ targets.

    inputs/targets: float32 [n, seq, hidden]. Only the correctable parameters are trained.
    """
    modules = [m for m in block.modules() if isinstance(m, CorrectableLinear)]
    initial = [m.latent.detach() >= 0 for m in modules]
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    code_params = [m.latent for m in modules]
    scale_params = [p for m in modules for p in (m.scale, m.log_s1, m.log_s2)]
    for parameter in code_params + scale_params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(
        [
            {"params": code_params, "lr": config.lr_codes},
            {"params": scale_params, "lr": config.lr_scales},
        ]
    )
    generator = torch.Generator().manual_seed(config.seed)

    def full_mse() -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, inputs.shape[0], config.batch):
                out = run_block(block, inputs[start : start + config.batch])
                want = targets[start : start + config.batch].to(out.device)
                total += float((out - want).pow(2).sum())
            return total / targets.numel()

    before = full_mse()
    snapshot = {id(p): p.detach().clone() for p in code_params + scale_params}
    norm = targets.pow(2).mean().clamp_min(1e-12)
    for _ in range(config.steps):
        idx = torch.randint(0, inputs.shape[0], (config.batch,), generator=generator, device="cpu")
        out = run_block(block, inputs[idx])
        loss = (out - targets[idx].to(out.device)).pow(2).mean() / norm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = full_mse()
    if after > before:  # never hand back a block worse than the plain encoding
        with torch.no_grad():
            for parameter in code_params + scale_params:
                parameter.copy_(snapshot[id(parameter)])
        after = before
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    changed = sum(
        int(((m.latent.detach() >= 0) != s).sum()) for m, s in zip(modules, initial, strict=True)
    )
    total_bits = sum(s.numel() for s in initial)
    return CorrectionResult(before, after, changed / max(total_bits, 1))
