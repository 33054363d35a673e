"""Calibration statistics of a block's linears: the Gram matrix X^T X and mean |x| per input,
and with a full-precision reference each linear's Y_f^T X (quant/compensate.py).

Linears that read the same tensor (q/k/v, gate/up) share one accumulator: the fp64 Gram is
computed once per distinct input. Contributions are per calibration batch and are summed in
one fixed binary tree over the batch index, the same tree whatever the number of processes:

    node(level, i) = node(level-1, 2i) + node(level-1, 2i+1)     (a missing right child: the
    left one alone)      leaves node(0, b) = sum over batch b's tokens

A process that holds batches [lo, hi) builds the largest nodes inside its range (a stack of
at most log2 + 1 of them) and the owner of a linear merges every process's nodes, left to
right, and completes the tree, so a 2-process run sums in exactly the order a 1-process run
does and the Gram matrices, hence the codes, match bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn

Node = tuple[int, int]  # (level, index): covers batches [index << level, (index + 1) << level)
# (sum x^T x [n, n] fp64, sum |x| [n] fp64, token count [] fp64: exact below 2^53), then for
# each linear reading it that is measured against a reference (in firing order) the sum
# y_f^T x [o, n] fp64, y_f that linear's output in the full-precision block
Partial = tuple[torch.Tensor, ...]


def add(a: Partial, b: Partial) -> Partial:
    assert len(a) == len(b), "partials of one input have the same parts"
    return tuple(x + y for x, y in zip(a, b, strict=True))


def siblings(left: Node, right: Node) -> bool:
    """Whether two adjacent nodes are the two children of one parent."""
    return left[0] == right[0] and left[1] % 2 == 0 and right[1] == left[1] + 1


def range_nodes(lo: int, hi: int) -> list[Node]:
    """The nodes a process holding batches [lo, hi) ends with, left to right: the nodes
    `TreeSum` builds over those batches (its merge rule, without the values)."""
    tree = TreeSum()
    for leaf in range(lo, hi):
        tree.push(leaf, None)
    return [node for node, _ in tree.stack]


@dataclass
class TreeSum:
    """The running tree sum of one input's partials over consecutive batches."""

    stack: list[tuple[Node, Partial | None]] = field(default_factory=list)

    def push(self, leaf: int, value: Partial | None) -> None:
        """Add batch `leaf`'s partial (None: track the nodes only)."""
        self.push_node((0, leaf), value)

    def push_node(self, node: Node, value: Partial | None) -> None:
        """Add the next node to the right (a leaf, or a whole subtree another process
        summed), merging it with its left sibling as `complete` would."""
        self.stack.append((node, value))
        while len(self.stack) >= 2 and siblings(self.stack[-2][0], self.stack[-1][0]):
            ((level, index), left), (_, right) = self.stack[-2], self.stack[-1]
            merged = None if left is None or right is None else add(left, right)
            self.stack[-2:] = [((level + 1, index // 2), merged)]


def complete(nodes: dict[Node, Partial], batches: int) -> Partial:
    """The root of the tree over `batches` leaves from nodes that cover them all."""

    def value(level: int, index: int) -> Partial | None:
        if (level, index) in nodes:
            return nodes[(level, index)]
        if index << level >= batches or level == 0:
            return None
        left, right = value(level - 1, 2 * index), value(level - 1, 2 * index + 1)
        if left is None or right is None:
            return left if right is None else right
        return add(left, right)

    top = max(0, (batches - 1).bit_length())
    root = value(top, 0)
    assert root is not None, "nodes do not cover the batches"
    return root


@dataclass(frozen=True)
class Reference:
    """The full-precision side of the cross statistic Y = E[y_f x^T] of a linear: y_f its
    output in the full-precision block on the full-precision inputs, x its input here.

    inputs: the full-precision model's input to the block, float32 [n, seq, hidden], rows
    aligned with the quantized inputs; full_precision(): a context in which the block
    computes as the full-precision one (its quantized linears swapped back); names: the
    linears measured against it (those that see the same tokens in both passes: not routed
    experts, whose routing may differ)."""

    inputs: torch.Tensor
    full_precision: Callable[[], AbstractContextManager]
    names: frozenset[str]


@dataclass
class BlockStats:
    """Per-input tree sums of one block's linears over this process's batches.

    groups: input name (the first linear reading it) -> the linears that read it;
    sums: input name -> its TreeSum. Every linear of a dense block sees every calibration
    token; an expert's linears see the tokens routed to it (none, in some batches), so each
    sum counts its own tokens.
    """

    groups: dict[str, list[str]]
    sums: dict[str, TreeSum]

    def nodes(self, name: str) -> dict[Node, Partial]:
        return dict(self.sums[name].stack)


def collect(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch: int,
    first_batch: int = 0,
    reference: Reference | None = None,
) -> BlockStats:
    """Run `inputs` (float32 [n, seq, hidden], this process's windows, starting at global
    batch `first_batch`) through `block` one batch at a time and sum every linear input's
    x^T x and |x| in fp64 on the input's device; with a `reference`, also y_f^T x for each of
    its linears, y_f the linear's output (bias removed) in the full-precision block on the
    same batch of reference.inputs."""
    groups: dict[str, list[str]] = {}
    sums: dict[str, TreeSum] = {}
    current: dict[str, Partial] = {}  # this batch's contribution per input
    # id of an input tensor in this batch -> (the tensor, kept alive so ids stay unique; its
    # input name)
    seen: dict[int, tuple[torch.Tensor, str]] = {}
    leader: dict[str, str] = {}  # linear -> the input name it reads
    reference_outputs: dict[str, torch.Tensor] = {}  # this batch's reference pass, by linear
    recording = False  # True while the reference pass runs

    def hook(module, args, out, name: str) -> None:
        x = args[0]
        if recording:
            bias = getattr(module, "bias", None)
            reference_outputs[name] = (out if bias is None else out - bias).detach()
            return
        entry = seen.get(id(x))
        measured = reference is not None and name in reference.names
        flat = x.detach().reshape(-1, x.shape[-1]).double() if entry is None or measured else x
        if entry is None:
            key = leader.setdefault(name, name)
            count = torch.tensor(float(flat.shape[0]), dtype=torch.float64, device=flat.device)
            current[key] = (flat.T @ flat, flat.abs().sum(0), count)
            seen[id(x)] = (x, key)
        else:
            key = leader.setdefault(name, entry[1])
            assert key == entry[1], f"{name} changed its input between batches"
        if measured:
            current[key] += (reference_output(name, flat).T @ flat,)
        if name not in groups.setdefault(key, []):
            groups[key].append(name)

    def reference_output(name: str, flat: torch.Tensor) -> torch.Tensor:
        other = reference_outputs.get(name)
        assert other is not None and other.numel() // other.shape[-1] == flat.shape[0], (
            f"{name} saw other tokens in the full-precision pass"
        )
        return other.reshape(flat.shape[0], -1).double()

    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name, m in linears.items()
    ]
    try:
        with torch.no_grad():
            for index, start in enumerate(range(0, inputs.shape[0], batch)):
                if reference is not None:
                    reference_outputs.clear()
                    recording = True
                    with reference.full_precision():
                        run(block, reference.inputs[start : start + batch])
                    recording = False
                seen.clear()
                current.clear()
                run(block, inputs[start : start + batch])
                for key, value in current.items():
                    sums.setdefault(key, TreeSum()).push(first_batch + index, value)
    finally:
        for handle in handles:
            handle.remove()
    return BlockStats(groups, sums)


def finish(total: Partial) -> tuple[torch.Tensor, ...]:
    """(Gram / tokens, mean |x|) as float32: what whitening and LDLQ take (NaN for an input
    that saw no token: an expert calibration never routed to), then each cross part
    Y = E[y_f x^T] (float64, what compensation solves with)."""
    gram, absolute, tokens, *cross = total
    return (gram / tokens).float(), (absolute / tokens).float(), *(c / tokens for c in cross)


def batch_ranges(batches: int, world: int) -> list[tuple[int, int]]:
    """Contiguous, balanced batch ranges [lo, hi) per rank (earlier ranks take the extra)."""
    base, extra = divmod(batches, world)
    ranges, lo = [], 0
    for rank in range(world):
        hi = lo + base + (rank < extra)
        ranges.append((lo, hi))
        lo = hi
    return ranges
