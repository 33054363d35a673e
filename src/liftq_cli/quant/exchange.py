"""What the ranks of one quantize job exchange in the block stage (quant/blocks.py calls
these; with one process each is the plain computation, no exchange):

    gram_stats        every rank's Gram tree nodes to the owners of the linears reading them
    share_state       an encoded linear from its owner to every rank (codes bit-packed)
    share_correction  rank 0's trained latents and scales to every rank

Exchanges move whole tensors in one fixed order; nothing is summed across ranks in floating
point except through quant/stats.py's fixed tree, so results do not depend on the number of
processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from liftq_cli.io.codes import pack_codes, unpack_codes
from liftq_cli.quant.block_correction import CorrectableLinear, CorrectionResult
from liftq_cli.quant.experts import routers
from liftq_cli.quant.parallel import Ranks, Team
from liftq_cli.quant.stats import Reference, TreeSum, collect, complete, finish, range_nodes

RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def linear_kinds(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder block that liftq quantizes, keyed by its dotted name
    (self_attn.q_proj, mlp.experts.3.down_proj, ...): all but the routers of experts."""
    skip = routers(block)
    return {
        name: m
        for name, m in block.named_modules()
        if isinstance(m, nn.Linear) and name not in skip
    }


def gram_stats(
    block: nn.Module,
    run: RunBlock,
    inputs: torch.Tensor,
    team: Team,
    owner: dict[str, int],
    linears: dict[str, nn.Linear] | None = None,
    reference: Reference | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict[str, int]]:
    """(Gram, mean |x|) of the linears this rank owns (`owner`: linear -> rank; absent means
    rank 0), from every rank's tree nodes over its own windows (`team.local(inputs)`), and
    every linear's token count over all ranks (the same on each). With a `reference` (its
    inputs this rank's rows, as `team.local` gives them) the linears in reference.names get
    a third value, Y = E[y_f x^T] [out, in] (quant/stats.py).

    Each input's nodes go to the ranks owning one of its linears in one fixed order (input,
    source rank, destination rank, node), so the point-to-point exchange cannot deadlock
    and the owner adds them up exactly as one process would. linears: those to measure
    (default: all of `linear_kinds`)."""
    ranks = team.ranks
    linears = linear_kinds(block) if linears is None else linears
    found = collect(
        block, linears, run, team.local(inputs), team.batch, team.first_batch, reference
    )
    every = [range_nodes(lo, hi) for lo, hi in team.ranges]  # each rank's nodes
    local = {
        name: int(sum(float(v[2]) for _, v in found.sums[key].stack))
        for key, names in found.groups.items()
        for name in names
    }
    every_count = ranks.all_objects(local)  # one collective: counts are exact integers
    tokens = {name: sum(counts.get(name, 0) for counts in every_count) for name in local}
    out = {}
    for key, names in found.groups.items():
        nodes = found.nodes(key)
        need = sorted({owner.get(n, 0) for n in names})  # ranks owning a linear reading it
        own = nodes[every[ranks.rank][0]]  # every rank's nodes have the same parts
        width, cross_shapes = own[1].shape[0], [tuple(part.shape) for part in own[3:]]
        merged = TreeSum()  # on an owner: every rank's nodes, left to right, siblings merged
        for src in range(ranks.world):
            if ranks.rank == src and src in need:
                for node in every[src]:
                    merged.push_node(node, nodes[node])
            for dst in need:
                if src == dst:
                    continue
                for node in every[src]:
                    if ranks.rank == src:
                        for part in nodes[node]:
                            ranks.send(part, dst)
                    elif ranks.rank == dst:
                        gram = ranks.recv((width, width), torch.float64, src)
                        absolute = ranks.recv((width,), torch.float64, src)
                        count = ranks.recv((), torch.float64, src)
                        cross = [ranks.recv(shape, torch.float64, src) for shape in cross_shapes]
                        merged.push_node(node, (gram, absolute, count, *cross))
        del nodes
        if ranks.rank in need:
            gram, act, *cross = finish(complete(dict(merged.stack), team.batches))
            measured = [n for n in names if reference is not None and n in reference.names]
            for n in names:
                if owner.get(n, 0) == ranks.rank:
                    own_cross = [cross[measured.index(n)]] if n in measured else []
                    out[n] = (gram, act, *own_cross)
    return out, tokens


def share_state(
    ranks: Ranks, mine: tuple[dict[str, torch.Tensor], list[float]] | None, src: int
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """A linear's encoded state and its [proxy error, whiten s, encode s], from its owner
    `src` to every rank (tensors on each rank's compute device; codes travel bit-packed)."""
    if ranks.world == 1:
        assert mine is not None
        return mine
    given = None
    if mine is not None:
        given = {k: pack_codes(v) if k == "codes" else v for k, v in mine[0].items()}
    meta = None if mine is None else {
        "shapes": {k: (tuple(v.shape), v.dtype) for k, v in given.items()},
        "codes": tuple(mine[0]["codes"].shape[1:]),
        "numbers": mine[1],
    }  # fmt: skip
    meta = ranks.broadcast_object(meta, src)
    state = {}
    for key, (shape, dtype) in meta["shapes"].items():
        state[key] = ranks.broadcast(None if given is None else given[key], shape, dtype, src)
    if given is None:
        state["codes"] = unpack_codes(state["codes"], *meta["codes"])
    else:
        state["codes"] = mine[0]["codes"]
    return state, meta["numbers"]


def share_correction(
    ranks: Ranks, block: nn.Module, result: CorrectionResult | None
) -> CorrectionResult:
    """The root's trained latents, scales and whitening scales, and its result, on every
    rank."""
    if ranks.world == 1:
        assert result is not None
        return result
    for module in block.modules():
        if isinstance(module, CorrectableLinear):
            for parameter in (module.latent, module.scale, module.log_s1, module.log_s2):
                value = ranks.broadcast(parameter.data, parameter.shape, parameter.dtype, 0)
                if not ranks.root:
                    parameter.data.copy_(value)
    return ranks.broadcast_object(result, 0)
