"""How a mixture-of-experts block stores its experts, and one expert's slices of them.

transformers keeps E experts as fused 3-D tensors (`gate_up_proj` [E, 2I, H], or transposed
[E, H, 2I]; `down_proj`; optional biases) with flags for the layout; liftq's formats keep one
linear per expert matrix (`experts.3.gate_proj`, `up_proj`, `down_proj`). Pure tensor code,
shared by the checkpoint view (io/model_weights.py) and the loaders (quant/experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused experts module stores its E experts (transformers' flags)."""

    experts: int
    hidden: int
    intermediate: int
    transposed: bool  # [E, in, out] rather than [E, out, in]
    concatenated: bool  # gate_up rows [gate; up] rather than interleaved g0 u0 g1 u1 ...
    bias: bool
    gate: bool  # gate_up_proj (a GLU) rather than up_proj alone
    routed: bool  # called with (hidden, top_k_index, top_k_weights); else dense rows

    @property
    def parts(self) -> tuple[str, ...]:
        return PARTS if self.gate else PARTS[1:]


def fused_names(layout: ExpertLayout) -> tuple[str, ...]:
    """The fused module's parameter names (what a fused checkpoint stores under its path)."""
    names = ("gate_up_proj" if layout.gate else "up_proj", "down_proj")
    return names + tuple(f"{n}_bias" for n in names) if layout.bias else names


def split_expert(fused: dict[str, torch.Tensor], layout: ExpertLayout) -> dict[str, torch.Tensor]:
    """One expert's slices of the fused tensors (`fused`: name -> that expert's [out, in] or
    [in, out] matrix or [out] bias, as `fused_names`) as its linears' tensors,
    {"gate_proj.weight": [I, H], ...}."""
    out = {}
    for name, tensor in fused.items():
        stem = name.removesuffix("_bias")
        kind = "bias" if name.endswith("_bias") else "weight"
        matrix = tensor.T if layout.transposed and kind == "weight" else tensor
        if stem == "gate_up_proj":
            if layout.concatenated:
                gate, up = matrix.chunk(2, dim=0)
            else:
                gate, up = matrix[0::2], matrix[1::2]
            out[f"gate_proj.{kind}"], out[f"up_proj.{kind}"] = gate, up
        else:
            out[f"{stem}.{kind}"] = matrix
    return {k: v.contiguous() for k, v in out.items()}
