"""Intra-block correction: train codes, row scales and whitening scales of a whole block.

Every quantised linear of a decoder block is replaced by a `CorrectableLinear` whose sign codes
live as a continuous latent L with q = sign(L) and a straight-through gradient (clipped to
|L| <= 1). Adam then minimises the error between the block's output and its full-precision
output on calibration inputs (paper appendix A): the squared error (`loss: mse`), or each
token's squared error relative to its full-precision output's norm (`loss: token`). The two
differ where a few tokens carry most of the residual stream's energy: in SmolLM2-135M the
position-0 (attention-sink) states hold 10% of block 3's squared output and 97% of block
15's, so the squared error trains those tokens and leaves the rest, whose output the next
block's RMSNorm rescales to the same size as the sink's.

The latents start at the encoder's continuous pre-sign values (quant/encode.py
`flip_margins`: about 1 for a bit at its optimum, near 0 for a bit whose flip barely costs
anything), clipped to [MARGIN_FLOOR, 1] and times `latent_init`. Adam moves every latent by
about lr_codes a step, so the bits the layer is least sure of are the ones the block's
gradient flips first, one by one as the steps accumulate, while the sure ones (latent 1)
would need 1 / lr_codes consistent steps. (A uniform start, the old 0.05 for every bit,
flipped all bits of one gradient sign in the same step: the block got worse and the run was
rejected, bench/results/correction.md.)

What of T* = blockdiag(M)^T T^-1 is trained: s1 and s2, the diagonal parts of T, and the row
scales s. The lattice matrix M is shared by every linear of a config (the packed file stores
it once) and the rotations P1, P2 stay as whitening left them (trained or fixed,
`whiten_rotations`), so the packed layout and size are exactly those of the encoder's output:
the same code bits, one fp16 row scale and fp16 s1, s2 per linear.

The last `heldout` calibration windows are never trained on: every `eval_every` steps the
block's MSE on them is measured, the best state is kept, and training stops after `patience`
measurements without a gain. The block handed back is never worse than the plain encoding,
on the held-out windows or on all of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from liftq_cli.quant.reconstruct import QuantizedLinear, reconstruct
from liftq_cli.quant.whitening import Whitening
from liftq_cli.quantize_job import CorrectionConfig

# The smallest start |L|: a bit whose flip alone would help still waits for its block's
# gradient to agree for a step or more.
MARGIN_FLOOR = 0.02


def ste_sign(latent: torch.Tensor) -> torch.Tensor:
    """sign(L) forward; gradient 1 where |L| <= 1, else 0."""
    hard = torch.where(latent >= 0, 1.0, -1.0)
    soft = latent.clamp(-1.0, 1.0)
    return soft + (hard - soft).detach()


class CorrectableLinear(nn.Module):
    """A fake-quantised linear whose codes and scales can be trained through STE."""

    def __init__(
        self,
        quant: QuantizedLinear,
        bias: torch.Tensor | None,
        latent_init: float,
        margin: torch.Tensor | None = None,
    ):
        """margin: the encoder's per-bit pre-sign values over their sign (`flip_margins`);
        None starts every latent at +-latent_init."""
        super().__init__()
        self.cfg = quant.cfg
        self.in_features = quant.in_features
        start = quant.signs() * latent_init
        if margin is not None:
            start = start * margin.to(start.device, start.dtype).clamp(MARGIN_FLOOR, 1.0)
        self.latent = nn.Parameter(start)
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
    mse_before: float  # on every calibration window
    mse_after: float
    flipped: float  # fraction of code bits changed
    steps: int = 0  # the step whose state was kept (0: the plain encoding)
    heldout_before: float = 0.0  # MSE on the held-out windows (0.0: none held out)
    heldout_after: float = 0.0


def _snapshot(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    """Copies in host memory: the start and the best state (4 bytes a code bit each) stay off
    the GPU, where a Llama-3-70B block's latents and Adam state already take 16 bytes a bit."""
    return [p.detach().to("cpu", copy=True) for p in parameters]


def block_error(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The block's error on [n, seq, hidden] outputs: "mse", squared errors (any shape);
    "token", each token's squared error over its target's squared norm ([n, seq])."""
    diff = (out - target.to(out.device)).pow(2)
    if loss != "token":
        return diff
    return diff.sum(-1) / target.to(out.device).pow(2).sum(-1).clamp_min(1e-12)


def heldout_count(config: CorrectionConfig, windows: int) -> int:
    """Windows held out of training: config.heldout, at most half of them."""
    return min(config.heldout, windows // 2)


def correct_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    config: CorrectionConfig,
) -> CorrectionResult:
    """Train every `CorrectableLinear` inside `block` so run_block(block, inputs) ~ targets.

    inputs/targets: float32 [n, seq, hidden]; the last `heldout_count` windows judge the
    steps (without any, all windows do, once at the end). Only the correctable parameters
    are trained.
    """
    modules = [m for m in block.modules() if isinstance(m, CorrectableLinear)]
    initial = [m.latent.detach() >= 0 for m in modules]
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    code_params = [m.latent for m in modules]
    scale_params = [p for m in modules for p in (m.scale, m.log_s1, m.log_s2)]
    trained = code_params + scale_params
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(
        [
            {"params": code_params, "lr": config.lr_codes},
            {"params": scale_params, "lr": config.lr_scales},
        ]
    )
    # cosine decay to 0 over `steps`: the late, small steps settle the scales (on SmolLM2
    # block 3 at LQ-24/10, held-out MSE -12.5% vs -11.7% at a constant rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: 0.5 * (1 + math.cos(math.pi * done / max(config.steps, 1)))
    )
    generator = torch.Generator().manual_seed(config.seed)
    windows = inputs.shape[0]
    held = heldout_count(config, windows)
    train = windows - held

    def mse(start: int, stop: int) -> float:
        with torch.no_grad():
            total = 0.0
            for first in range(start, stop, config.batch):
                last = min(first + config.batch, stop)
                out = run_block(block, inputs[first:last])
                total += float(block_error(out, targets[first:last], config.loss).sum())
            count = targets[start:stop].numel()
            return total / max(count // targets.shape[-1] if config.loss == "token" else count, 1)

    def judge() -> float:
        return mse(train, windows) if held else mse(0, windows)

    before = mse(0, windows)
    held_before = mse(train, windows) if held else before
    start = _snapshot(trained)
    best = (held_before, 0, start)
    norm = targets[:train].pow(2).mean().clamp_min(1e-12)
    stale = 0
    for step in range(1, config.steps + 1):
        idx = torch.randint(0, train, (config.batch,), generator=generator, device="cpu")
        out = run_block(block, inputs[idx])
        if config.loss == "token":
            loss = block_error(out, targets[idx], "token").mean()
        else:
            loss = (out - targets[idx].to(out.device)).pow(2).mean() / norm
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if held and (step % config.eval_every == 0 or step == config.steps):
            score = judge()
            if score < best[0]:
                best, stale = (score, step, _snapshot(trained)), 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    if not held and config.steps:  # no held-out windows: keep the end if it is better
        score = judge()
        if score < best[0]:
            best = (score, config.steps, [])
    if best[2]:
        with torch.no_grad():
            for parameter, value in zip(trained, best[2], strict=True):
                parameter.copy_(value)
    after = mse(0, windows) if best[1] else before
    if after > before:  # better where it was judged, worse over all windows: the start
        with torch.no_grad():
            for parameter, value in zip(trained, start, strict=True):
                parameter.copy_(value)
        best, after = (held_before, 0, []), before
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    changed = sum(
        int(((m.latent.detach() >= 0) != s).sum()) for m, s in zip(modules, initial, strict=True)
    )
    total_bits = sum(s.numel() for s in initial)
    return CorrectionResult(
        before,
        after,
        changed / max(total_bits, 1),
        best[1],
        held_before if held else 0.0,
        best[0] if held else 0.0,
    )
