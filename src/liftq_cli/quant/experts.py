"""Mixture-of-experts blocks with one `nn.Linear` per expert matrix.

transformers keeps a block's experts as fused 3-D parameters (`experts.gate_up_proj`
[E, 2I, H] or transposed [E, H, 2I], `experts.down_proj`, optional biases). liftq quantizes,
stores and serves each expert's matrices as linears of their own, so `unfuse_experts`
swaps every fused experts module for an `ExpertList`: child `e` holds expert e's
`gate_proj`, `up_proj` and `down_proj` (names of the per-expert checkpoints Qwen3-MoE and
DeepSeek publish, and of liftq's formats: `mlp.experts.3.gate_proj`), and the forward is
the fused module's own math (its gate function: SiLU-GLU, gpt-oss's clamped GLU) on each
expert's routed tokens. Nothing here names an architecture: the layout comes from the
module's transformers flags (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`),
and its call signature says how tokens arrive:

    routed  experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])  (Qwen, Mixtral,
            gpt-oss, DeepSeek)
    dense   experts(hidden [E*T, H]), rows already scaled by the router, a zero row for a
            token not routed to the expert (Llama 4)

In either case each expert sees only its routed tokens, so hooks on its linears measure
the Gram matrix of exactly those. `route_all` names experts that also receive every token
(weight 0): how the block stage calibrates experts calibration never routes to.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.io.expert_layout import ExpertLayout, split_expert


class Expert(nn.Module):
    """One expert's linears: gate_proj (if gated), up_proj, down_proj."""

    def __init__(self, layout: ExpertLayout) -> None:
        super().__init__()
        width = {"gate_proj": (layout.hidden, layout.intermediate)}
        width["up_proj"] = width["gate_proj"]
        width["down_proj"] = (layout.intermediate, layout.hidden)
        for part in layout.parts:
            self.add_module(part, nn.Linear(*width[part], bias=layout.bias))


class ExpertList(nn.ModuleList):
    """A fused experts module's experts as `Expert` children, computing what it computed."""

    def __init__(self, fused: nn.Module, layout: ExpertLayout) -> None:
        super().__init__(Expert(layout) for _ in range(layout.experts))
        self.layout = layout
        self.route_all: frozenset[int] = frozenset()
        for name in list(fused._parameters):  # keep its gate function and constants only
            delattr(fused, name)
        self.__dict__["_fused"] = fused  # not a submodule: holds no tensors

    def _hidden(self, expert: Expert, x: torch.Tensor) -> torch.Tensor:
        up = expert.up_proj(x)
        if not self.layout.gate:
            return self._fused.act_fn(up)
        gate = expert.gate_proj(x)
        if not hasattr(self._fused, "_apply_gate"):  # an experts module of its own (Llama 4)
            return self._fused.act_fn(gate) * up
        if self.layout.concatenated:
            both = torch.cat([gate, up], dim=-1)
        else:
            both = torch.stack([gate, up], dim=-1).flatten(-2)
        return self._fused._apply_gate(both)

    def run_expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        expert = self[index]
        return expert.down_proj(self._hidden(expert, x))

    def forward(self, hidden: torch.Tensor, *routing: torch.Tensor) -> torch.Tensor:
        if self.layout.routed:
            return self._routed(hidden, *routing)
        return self._dense(hidden)

    def _routed(self, hidden: torch.Tensor, index: torch.Tensor, weight: torch.Tensor):
        out = torch.zeros_like(hidden)
        for e in range(len(self)):
            token, slot = torch.where(index == e)
            if e in self.route_all:  # every token in, the routed ones' outputs used
                y = self.run_expert(e, hidden)[token]
            else:  # every expert runs, on 0 tokens or more: its hooks fire every batch
                y = self.run_expert(e, hidden[token])
            out.index_add_(0, token, (y * weight[token, slot, None]).to(out.dtype))
        return out

    def _dense(self, hidden: torch.Tensor) -> torch.Tensor:
        rows = hidden.view(len(self), -1, hidden.shape[-1])
        out = torch.zeros_like(rows)
        for e in range(len(self)):
            token = rows[e].abs().sum(-1).nonzero()[:, 0]  # a zero row: not routed here
            if e in self.route_all:  # every token in, as routed to the experts together
                y = self.run_expert(e, rows.sum(0))[token]
            else:
                y = self.run_expert(e, rows[e, token])
            out[e, token] = y.to(out.dtype)
        return out.view(-1, hidden.shape[-1])


def layout_of(module: nn.Module, hidden: int) -> ExpertLayout | None:
    """The layout of a fused experts module (3-D `down_proj` and `gate_up_proj` or
    `up_proj` parameters), or None for any other module."""
    params = module._parameters
    up = params.get("gate_up_proj", params.get("up_proj"))
    down = params.get("down_proj")
    if up is None or down is None or up.ndim != 3 or down.ndim != 3:
        return None
    transposed = getattr(module, "is_transposed", down.shape[-1] == hidden != down.shape[1])
    signature = inspect.signature(type(module).forward)
    arity = len(signature.parameters) - 1
    if arity not in (1, 3):
        raise BadInputError(
            f"experts module {type(module).__name__} takes {arity} arguments; liftq knows "
            "experts called with routed tokens (3) or with router-scaled rows (1)"
        )
    gate = "gate_up_proj" in params
    return ExpertLayout(
        experts=up.shape[0],
        hidden=hidden,
        intermediate=down.shape[1] if transposed else down.shape[2],
        transposed=bool(transposed),
        concatenated=bool(getattr(module, "is_concatenated", True)),
        bias=f"{'gate_up_proj' if gate else 'up_proj'}_bias" in params,
        gate=gate,
        routed=arity == 3,
    )


def unfuse_experts(model: nn.Module, hidden: int) -> dict[str, ExpertLayout]:
    """Swap every fused experts module of `model` (any device, meta included) for an
    `ExpertList` of empty linears on the same device; returns {dotted path: layout}. A
    model without fused experts is left as it is."""
    found = {}
    for name, module in list(model.named_modules()):
        layout = layout_of(module, hidden)
        if layout is None:
            continue
        device = next(iter(module.parameters())).device
        parent, _, leaf = name.rpartition(".")
        with torch.device(device):
            replacement = ExpertList(module, layout)
        setattr(model.get_submodule(parent) if parent else model, leaf, replacement)
        found[name] = layout
    return found


def routers(block: nn.Module) -> set[str]:
    """Dotted names of the linears in `block` that route tokens to experts: a linear beside
    an `ExpertList` whose outputs are one per expert (Llama 4's router). They stay in high
    precision: a router's error changes which experts a token reaches."""
    names = set()
    for path, module in block.named_modules():
        if not isinstance(module, ExpertList):
            continue
        parent_path = path.rpartition(".")[0]
        parent = block.get_submodule(parent_path) if parent_path else block
        for leaf, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features == len(module):
                names.add(f"{parent_path}.{leaf}" if parent_path else leaf)
    return names


def expert_lists(model: nn.Module) -> dict[str, ExpertList]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertList)}


def unfuse_loaded(model: nn.Module, hidden: int) -> dict[str, ExpertLayout]:
    """`unfuse_experts` for a model holding weights: each expert's linears get its slices."""
    fused = {
        name: {k: p.detach() for k, p in module._parameters.items() if p is not None}
        for name, module in model.named_modules()
        if layout_of(module, hidden) is not None
    }
    layouts = unfuse_experts(model, hidden)
    with torch.no_grad():
        for name, layout in layouts.items():
            experts = model.get_submodule(name)
            for e in range(layout.experts):
                parts = split_expert({k: v[e] for k, v in fused[name].items()}, layout)
                for key, tensor in parts.items():
                    experts[e].get_parameter(key).copy_(tensor)
    return layouts


def expert_layouts(model: nn.Module) -> dict[str, ExpertLayout]:
    return {name: m.layout for name, m in expert_lists(model).items()}
