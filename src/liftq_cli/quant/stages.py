"""The order a block's linears are encoded in: stages of its dataflow (true-sequential).

A linear's input depends on the linears before it in the block (o_proj reads what q/k/v
made, down_proj what gate/up made). Stage k holds the linears whose input depends only on
linears of stages below k, so encoding stage by stage, each stage's statistics measured
with the earlier stages already quantized, lets every linear see (and, with compensation,
correct) the error the earlier ones leave: a Llama block has four stages (q/k/v, o, gate/up,
down), a mixture-of-experts block the same four with every expert's gate/up in the third.

The stages come from the block itself, not from linear names: one forward over a sample
adds a zero marker (a scalar that requires grad) to every linear's output, and autograd
tells which markers each linear's input depends on. Any architecture the block stage runs
is staged the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def linear_stages(
    block: nn.Module,
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    sample: torch.Tensor,
    linears: dict[str, nn.Module],
) -> list[list[str]]:
    """The linears of `block` (dotted names in `linears`) in dataflow stages, each stage in
    `linears`' order.

    sample: float32 [1, seq, hidden], one window of the block's input (its routing decides
    which experts fire; a linear the sample never reaches joins the last stage, after every
    linear it could depend on).
    """
    markers: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, out, name: str):
        seen[name] = args[0]
        marker = torch.zeros((), dtype=out.dtype, device=out.device, requires_grad=True)
        markers[name] = marker
        return out + marker

    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name, module in linears.items()
    ]
    try:
        with torch.enable_grad():
            run(block, sample)
    finally:
        for handle in handles:
            handle.remove()
    level: dict[str, int] = {}
    fired = [name for name in seen]  # in firing order: a linear depends only on earlier ones
    for index, name in enumerate(fired):
        x, earlier = seen[name], fired[:index]
        level[name] = 0
        if not earlier or not x.requires_grad:
            continue
        grads = torch.autograd.grad(
            x.sum(), [markers[e] for e in earlier], allow_unused=True, retain_graph=True
        )
        below = [level[e] for e, g in zip(earlier, grads, strict=True) if g is not None]
        level[name] = 1 + max(below) if below else 0
    last = max(level.values(), default=0)
    stages: list[list[str]] = [[] for _ in range(last + 1)]
    for name in linears:
        stages[level.get(name, last)].append(name)
    return [stage for stage in stages if stage]
