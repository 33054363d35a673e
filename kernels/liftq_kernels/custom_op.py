"""`torch.ops.liftq.linear`: the LiftQuant linear as a registered PyTorch custom op.

A serving engine traces its model with `torch.compile` and replays it as CUDA graphs; a Python
call that dispatches on shapes and environment variables (`ops.liftq_linear`) would break the
graph there, a registered op is one opaque node with a fake (meta) implementation that gives
the output's shape and dtype without running a kernel. The op computes exactly what
`ops.liftq_linear` computes (Triton on CUDA, torch on CPU) and allocates its output, so it
mutates nothing. `import liftq_kernels.custom_op` registers it once per process.
"""

from __future__ import annotations

import torch

from liftq_kernels.ops import liftq_linear

OP_NAME = "liftq::linear"


@torch.library.custom_op(OP_NAME, mutates_args=())
def linear(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    word_offset: int,
    total_words: int,
) -> torch.Tensor:
    """x [B, n] -> y [B, N] in x.dtype: `ops.liftq_linear` on a shard of the code words
    [word_offset, word_offset + W) of rows of `total_words` words (the whole row: offset 0,
    total_words = W)."""
    return liftq_linear(
        x, words, scale, s1, p1, p2, s2, lattice, word_offset=word_offset, total_words=total_words
    )


@linear.register_fake
def _(x, words, scale, s1, p1, p2, s2, lattice, word_offset, total_words):  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], words.shape[0])
