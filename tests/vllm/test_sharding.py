"""Tensor-parallel sharding of a packed linear, checked with simulated ranks (no vLLM needed).

What `liftq_cli.vllm.linear` does on rank r of t: column-parallel layers keep rows
`column_rows(...)`, row-parallel layers keep the code words `word_ranges(W, t)[r]` and lift
the whole (all-gathered) input. Here the ranks are loops: their outputs, concatenated or
summed as vLLM's all-gather / all-reduce would, must equal the unsharded layer's.
"""

from __future__ import annotations

import pytest
import torch

import liftq_kernels.custom_op  # noqa: F401  (torch.ops.liftq.linear)
from liftq_cli.io.packed_format import code_bits, whitening_factors, words_per_row
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.vllm.sharding import column_rows, fused_rows, word_ranges
from liftq_kernels.ops import liftq_linear
from liftq_kernels.reference import ROW_ALIGN_WORDS, pack_interleaved


def packed_linear(out: int, n: int, cfg: LatticeConfig, seed: int = 0):
    """Random format-2 tensors of one linear: (words, scale, s1, p1, p2, s2, lattice)."""
    g = torch.Generator().manual_seed(seed)
    a, b = whitening_factors(n)
    bits = torch.rand(out, code_bits(n, cfg), generator=g) > 0.5
    words = pack_interleaved(bits)
    assert words.shape[1] == words_per_row(n, cfg)
    p1, _ = torch.linalg.qr(torch.randn(a, a, generator=g))
    p2, _ = torch.linalg.qr(torch.randn(b, b, generator=g))
    return (
        words,
        (torch.rand(out, generator=g) + 0.1).half(),
        (torch.rand(n, generator=g) + 0.5).half(),
        p1.half().contiguous(),
        p2.half().contiguous(),
        (torch.rand(n, generator=g) + 0.5).half(),
        torch.randn(cfg.d, cfg.D, generator=g),
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("total", "world"), [(44, 2), (44, 3), (308, 2), (116, 4), (5, 2), (3, 4)])
def test_word_ranges_cover_the_row_in_aligned_pieces(total, world):
    ranges = word_ranges(total, world)
    assert len(ranges) == world
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start  # contiguous, in rank order
    for start, stop in ranges:
        assert start <= stop
        assert start % ROW_ALIGN_WORDS == 0 or start == stop == total  # empty tail shards
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= ROW_ALIGN_WORDS  # as even as 16-byte pieces allow


def test_column_rows_follow_vllms_head_layout():
    assert column_rows(576, 192, 2) == (384, 576)
    assert column_rows(192, 192, 1) == (0, 192)  # replicated layer / one rank: whole matrix
    # 2 kv heads of 64 on 4 ranks: ranks 0, 1 share head 0 and ranks 2, 3 head 1
    assert [column_rows(128, 64, r, replicas=2) for r in range(4)] == [
        (0, 64), (0, 64), (64, 128), (64, 128)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs rows"):
        column_rows(128, 64, 2)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    ("out", "n", "cfg"), [(64, 576, LatticeConfig(24, 10)), (24, 4096, LatticeConfig(16, 8))]
)
def test_row_parallel_partial_sums_add_up_to_the_layer(world, out, n, cfg):
    params = packed_linear(out, n, cfg)
    words, rest = params[0], params[1:]
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1))
    full = liftq_linear(x, *params, backend="torch")
    total = words.shape[1]
    partial = [
        liftq_linear(
            x,
            words[:, w0:w1].contiguous(),
            *rest,
            backend="torch",
            word_offset=w0,
            total_words=total,
        )
        for w0, w1 in word_ranges(total, world)
    ]
    assert rel(sum(partial), full) < 1e-5
    # a shard alone is not the layer: the test would notice a shard that ignored its offset
    assert rel(partial[0], full) > 0.1


@pytest.mark.parametrize("world", [2, 3])
def test_column_parallel_rows_concatenate_to_the_layer(world):
    cfg, out, n = LatticeConfig(24, 10), 96, 576
    words, scale, *whitening = packed_linear(out, n, cfg, seed=2)
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(3))
    full = liftq_linear(x, words, scale, *whitening, backend="torch")
    local = out // world
    pieces = []
    for rank in range(world):
        r0, r1 = column_rows(out, local, rank)
        pieces.append(liftq_linear(x, words[r0:r1], scale[r0:r1], *whitening, backend="torch"))
    assert torch.equal(torch.cat(pieces, dim=1), full)  # rows are independent: bit for bit


def test_row_shards_on_the_triton_kernels(monkeypatch):
    """The Triton path (interpreted on CPU) reads a shard's columns of z through a strided view."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by `make test`)")
    cfg, out, n = LatticeConfig(16, 8), 8, 512  # 1024 code bits: 32 words, 16 per rank
    params = packed_linear(out, n, cfg, seed=4)
    words, rest = params[0], params[1:]
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(5))
    full = liftq_linear(x, *params, backend="torch")
    total = words.shape[1]
    partial = [
        liftq_linear(
            x,
            words[:, w0:w1].contiguous(),
            *rest,
            backend="triton",
            word_offset=w0,
            total_words=total,
        )
        for w0, w1 in word_ranges(total, 2)
    ]
    assert rel(sum(partial), full) < 2e-3  # fp16 activations in the kernels


def test_a_shard_that_does_not_fit_its_row_is_refused():
    params = packed_linear(8, 576, LatticeConfig(24, 10))
    with pytest.raises(ValueError, match="do not fit rows of 44 words"):
        liftq_linear(
            torch.randn(1, 576), params[0][:, :24], *params[1:], word_offset=24, total_words=44
        )


def test_custom_op_matches_the_python_call_and_traces_as_one_node():
    params = packed_linear(16, 576, LatticeConfig(24, 10), seed=6)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(7))
    total = params[0].shape[1]
    expected = liftq_linear(x, *params)
    got = torch.ops.liftq.linear(x, *params, 0, total)
    assert torch.equal(got, expected)
    torch.library.opcheck(torch.ops.liftq.linear.default, (x, *params, 0, total))

    def layer(inp):
        return torch.ops.liftq.linear(torch.relu(inp), *params, 0, total) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # a graph break fails
    assert torch.equal(compiled(x), layer(x))


def test_fused_rows_take_each_segments_shard_in_order():
    # a fused q|k|v of 8 + 2 + 2 rows on 4 ranks with 1 kv head pair: q splits 4 ways, every
    # kv row sits on two ranks
    shards = [fused_rows([2, 1, 1], [8, 2, 2], rank, [1, 2, 2]) for rank in range(4)]
    assert shards == [[0, 1, 8, 10], [2, 3, 8, 10], [4, 5, 9, 11], [6, 7, 9, 11]]
    assert fused_rows([4, 4], [4, 4], 0, [1, 1]) == list(range(8))  # one rank: everything
