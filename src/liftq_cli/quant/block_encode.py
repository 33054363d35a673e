"""Whiten and lattice-encode one block's linears, stage by stage (before block correction).

With `true_sequential` the linears are encoded in their dataflow stages (quant/stages.py:
q/k/v, then o, then gate/up, then down): each stage's Gram matrices are measured on the
block with the earlier stages already quantized, so o_proj sees what the quantized q/k/v
produce. With `compensate` each linear is encoded toward the full-precision model's output
rather than its own (quant/compensate.py): the cross statistic pairs its input in the
quantized model (this block's quantized-so-far inputs, earlier stages quantized) with its
input in the full-precision one (the full-precision inputs, the block's original linears
swapped back in), token for token.

Every encoded linear replaces its nn.Linear as a `CorrectableLinear`, ready for correction.
With several ranks each stage's linears are spread over them by cost and broadcast, as the
block stage describes (quant/blocks.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.block_correction import CorrectableLinear
from liftq_cli.quant.compensate import compensated_weight
from liftq_cli.quant.costmodel import assign
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.exchange import linear_kinds, share_state
from liftq_cli.quant.expert_stats import block_stats
from liftq_cli.quant.experts import expert_lists
from liftq_cli.quant.ldlq import Encoder
from liftq_cli.quant.parallel import Team
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quant.stages import linear_stages
from liftq_cli.quant.stats import Reference
from liftq_cli.quant.whitening import fit_whitening
from liftq_cli.quantize_job import QuantizeSettings

ConfigFor = Callable[[int, str], LatticeConfig]
Matrices = Callable[[LatticeConfig], torch.Tensor]
RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class Encoded:
    """What encoding a block measured: each linear's whitening proxy error, the seconds of
    whitening and encoding on each rank, the experts that took the all-token fallback."""

    proxy: list[float] = field(default_factory=list)
    spent: list[list[float]] = field(default_factory=list)  # [whiten s, encode s] per rank
    unrouted: set[str] = field(default_factory=set)
    stages: int = 1


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@contextlib.contextmanager
def swapped(root: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """`root` with the submodules at the names of `modules` replaced by them, restored after."""
    current = {name: root.get_submodule(name) for name in modules}
    try:
        for name, module in modules.items():
            set_module(root, name, module)
        yield
    finally:
        for name, module in current.items():
            set_module(root, name, module)


def encode_block(
    block: nn.Module,
    layer: int,
    inputs: torch.Tensor,
    run: RunBlock,
    config_for: ConfigFor,
    matrices: Matrices,
    encode: Encoder,
    settings: QuantizeSettings,
    team: Team,
    reference_inputs: torch.Tensor | None = None,
) -> Encoded:
    """Replace every linear of `block` by its encoded `CorrectableLinear`, in place.

    inputs: float32 [n, seq, hidden], the block's inputs in the quantized model (full on the
    root with several ranks, this rank's windows elsewhere); reference_inputs: the same
    windows' inputs in the full-precision model (None: `inputs` are those, as for independent
    blocks), what compensation pairs them with.
    """
    ranks = team.ranks
    linears = linear_kinds(block)
    index = {name: i for i, name in enumerate(linears)}  # whitening seeds, as unstaged
    stages = [list(linears)]
    if settings.true_sequential:
        sample = team.local(inputs)[:1] if ranks.root else None
        stages = ranks.broadcast_object(
            linear_stages(block, run, sample, linears) if ranks.root else None
        )
    experts = tuple(f"{path}." for path in expert_lists(block))
    full = inputs if reference_inputs is None else reference_inputs
    originals: dict[str, nn.Module] = {}
    result = Encoded(spent=[[0.0, 0.0] for _ in range(ranks.world)], stages=len(stages))
    for stage in stages:
        members = {name: linears[name] for name in stage}
        costs = {n: float(m.out_features) * m.in_features**2 for n, m in members.items()}
        owner = assign(costs, ranks.world)
        reference = None
        if settings.compensate and (originals or full is not inputs):
            names = frozenset(n for n in stage if not n.startswith(experts))
            reference = Reference(team.local(full), lambda: swapped(block, originals), names)
        stats, idle = block_stats(block, run, inputs, team, owner, members, reference)
        result.unrouted |= idle
        done: dict[str, tuple[dict[str, torch.Tensor], list[float]]] = {}
        for name, linear in members.items():
            if owner[name] == ranks.rank:
                done[name] = _encode_linear(
                    linear, stats[name], config_for(layer, name.rpartition(".")[2]),
                    matrices, encode, settings, settings.seed * 1000 + layer * 16 + index[name],
                )  # fmt: skip
        for name, linear in members.items():
            cfg = config_for(layer, name.rpartition(".")[2])
            state, (err, whiten, encoded) = share_state(ranks, done.get(name), owner[name])
            result.proxy.append(err)
            result.spent[owner[name]][0] += whiten
            result.spent[owner[name]][1] += encoded
            matrix = matrices(cfg).to(linear.weight.device, torch.float32)
            quant = QuantizedLinear.from_state(state, cfg, matrix)
            bias = None if linear.bias is None else linear.bias.detach()
            margin = state.pop("margin", None)  # only the latents' start needs it
            correctable = CorrectableLinear(quant, bias, settings.correction.latent_init, margin)
            set_module(block, name, correctable)
            if settings.compensate:
                originals[name] = linear
        del stats, done  # the next stage's statistics need the room
    return result


def _encode_linear(
    linear: nn.Module,
    stats: tuple[torch.Tensor, ...],
    cfg: LatticeConfig,
    matrices: Matrices,
    encode: Encoder,
    settings: QuantizeSettings,
    seed: int,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One linear's state (codes, scale, whitening, and the latents' start `margin`) and
    [proxy error, whiten s, encode s]."""
    gram, act, *cross = stats
    weight = linear.weight.detach()
    tick = time.perf_counter()
    if cross:  # toward the full-precision output (quant/compensate.py)
        weight = compensated_weight(weight, gram, cross[0], settings.compensate_damp)
    solve = time.perf_counter() - tick  # counted with encoding, as the cost model does
    tick = time.perf_counter()
    wh, err = fit_whitening(
        weight,
        gram,
        act,
        cfg.bits,
        steps=settings.whiten_steps,
        seed=seed,
        # Error feedback already favours the high-energy input channels; on SmolLM2 the AWQ
        # exponent then adds error (bench/ldlq.py).
        alphas=(0.0,) if settings.ldlq else (0.0, 0.25, 0.5, 0.75),
        rotations=settings.whiten_rotations,
    )
    whiten = time.perf_counter() - tick
    tick = time.perf_counter()
    quant = quantize_linear(
        weight, wh, cfg, matrices(cfg), encode, gram=gram if settings.ldlq else None
    )
    state = quant.state()
    if quant.margin is not None:  # the latents' start, for correction (not stored)
        state["margin"] = quant.margin
    return state, [err, whiten, solve + time.perf_counter() - tick]
