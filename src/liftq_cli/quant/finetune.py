"""Model-level fine-tuning: an optional stage after the blockwise quantiser.

Block correction matches each block to its full-precision output on its own; the small errors
of every block still compound through the depth of the model. This stage trains, end to end,
the continuous parameters the packed format already stores — each linear's row scales s and
whitening scales s1, s2 (the diagonal parts of T*) — plus the RMSNorm weights, to minimise

    KL( p_fp(. | context) || p_quant(. | context) )   per token, over the calibration windows

(knowledge distillation from the full-precision model, as QuIP# and AQLM fine-tune after
their layerwise stage). Sign codes, lattice matrices and rotations stay fixed, so the packed
size is unchanged. Scales are trained as log-multipliers (a step changes every scale by the
same relative amount, whatever its magnitude); norm weights directly.

Memory: unlike the streaming block stage, both models are held whole (fp32), so the stage is
off unless asked for (`liftq quantize --finetune-steps N`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.quant.reconstruct import QuantizedLinear, reconstruct
from liftq_cli.quant.whitening import Whitening
from liftq_cli.quantize_job import FinetuneConfig


@dataclass
class FinetuneResult:
    kl_before: float  # mean per-token KL on the held-out windows
    kl_after: float
    kept: bool  # False: fine-tuning did not lower the KL, the block-stage values stand
    seconds: float
    losses: list[float] = field(default_factory=list)  # training KL per step


class TunedLinear(nn.Module):
    """A quantised linear whose row scales and whitening scales train; codes stay fixed.

    weight = reconstruct(Q, M, s, T) with s = s0 exp(u), s1 = s1_0 exp(u1), s2 = s2_0 exp(u2):
    only u, u1, u2 train (the codes Q and the lattice M are fixed).
    """

    def __init__(self, quant: QuantizedLinear, bias: torch.Tensor | None):
        super().__init__()
        self.quant = quant
        self.log_scale = nn.Parameter(torch.zeros_like(quant.scale))
        self.log_s1 = nn.Parameter(torch.zeros_like(quant.whitening.s1))
        self.log_s2 = nn.Parameter(torch.zeros_like(quant.whitening.s2))
        self.bias = None if bias is None else bias.detach()

    def whitening(self) -> Whitening:
        wh = self.quant.whitening
        return Whitening(wh.s1 * self.log_s1.exp(), wh.p1, wh.p2, wh.s2 * self.log_s2.exp())

    def weight(self) -> torch.Tensor:
        scale = self.quant.scale * self.log_scale.exp()
        return reconstruct(self.quant.signs(), self.quant.matrix, scale, self.whitening())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)

    def export(self) -> QuantizedLinear:
        wh = self.whitening()
        return QuantizedLinear(
            self.quant.cfg,
            self.quant.in_features,
            self.quant.codes,
            (self.quant.scale * self.log_scale.exp()).detach().clone(),
            Whitening(wh.s1.detach().clone(), wh.p1, wh.p2, wh.s2.detach().clone()),
            self.quant.matrix,
        )


def attach(model: nn.Module, quantized: dict[str, QuantizedLinear]) -> dict[str, TunedLinear]:
    """Replace each named nn.Linear of `model` (full dotted names) by a TunedLinear."""
    tuned = {}
    for name, quant in quantized.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        linear = getattr(owner, leaf)
        if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != (
            quant.out_features,
            quant.in_features,
        ):
            raise BadInputError(f"'{name}' is not a matching linear of the model")
        tuned[name] = TunedLinear(quant, linear.bias)
        setattr(owner, leaf, tuned[name])
    return tuned


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every normalisation weight of the model (RMSNorm/LayerNorm), by parameter name."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]
    }


def token_kl(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) on ids int64 [n, seq] (differentiable)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(ids).logits.float(), -1)
    logits = student(ids).logits.float()
    log_probs = torch.log_softmax(logits, -1)
    kl = nn.functional.kl_div(log_probs, target, log_target=True, reduction="sum")
    return kl / (ids.shape[0] * ids.shape[1])


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    tuned: dict[str, TunedLinear],
    train_ids: torch.Tensor,
    probe_ids: torch.Tensor,
    config: FinetuneConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> FinetuneResult:
    """Train the tuned linears' scales and the student's norm weights towards `teacher`.

    train_ids: int64 [n, seq], taken `batch` at a time in order (cycling when n is short);
    probe_ids: int64 [m, seq] held-out windows. Restores the starting values when the KL on
    the probe windows did not go down.
    """
    began = time.perf_counter()
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.requires_grad_(False)
    scales = [p for t in tuned.values() for p in (t.log_scale, t.log_s1, t.log_s2)]
    params = scales + list(norm_weights(student).values())
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    probe = probe_ids

    def measure() -> float:
        with torch.no_grad():
            return (
                sum(
                    float(token_kl(student, teacher, probe[i : i + config.batch]))
                    * probe[i : i + config.batch].shape[0]
                    for i in range(0, probe.shape[0], config.batch)
                )
                / probe.shape[0]
            )

    before = measure()
    optimizer = torch.optim.Adam(params, lr=config.lr)
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        pick = torch.arange(step * config.batch, (step + 1) * config.batch) % train_ids.shape[0]
        loss = token_kl(student, teacher, train_ids[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
        if progress is not None:
            progress(step + 1, config.steps, losses[-1])
    after = measure() if config.steps else before
    kept = after < before
    with torch.no_grad():
        if not kept:
            for p, value in zip(params, start, strict=True):
                p.copy_(value)
    for p in params:
        p.requires_grad_(False)
    return FinetuneResult(
        before, after if kept else before, kept, time.perf_counter() - began, losses
    )


def tuned_tensors(student: nn.Module, tuned: dict[str, TunedLinear]) -> dict[str, torch.Tensor]:
    """What fine-tuning changed, by checkpoint name: `{linear}.scale|s1|s2` (the codes file's
    keys) and every norm weight (the weights file's keys), float32."""
    out = {}
    for name, module in tuned.items():
        quant = module.export()
        out[f"{name}.scale"] = quant.scale.float().cpu().contiguous()
        out[f"{name}.s1"] = quant.whitening.s1.float().cpu().contiguous()
        out[f"{name}.s2"] = quant.whitening.s2.float().cpu().contiguous()
    for name, p in norm_weights(student).items():
        out[name] = p.detach().float().cpu().clone().contiguous()
    return out
