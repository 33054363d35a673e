"""Triton kernels against their float32 torch references, built from the same codes.

On CPU these run under TRITON_INTERPRET=1 (`make test` sets it); on a CUDA machine they run
on the GPU. Under the interpreter the GEMV forms its fp16 pair sums with plain ops in the
same order as its PTX (bitgemv.py); the PTX itself is compiled for sm_80/89/90 by
tests/bench/test_kernel_static.py. Shapes are odd on purpose: in/out features that are not
multiples of the block sizes, d not dividing in_features, K not a multiple of 32, factors of
every kind (prime, power of two = Hadamard, large). Outputs are pre-filled with NaN so a
skipped store fails. Bounds are relative Frobenius errors against the float32 reference:
the lift is float32 (1e-5 of z once z16's own rounding, 2^-11, is accounted for); the GEMV
adds fp16 partial sums of 16 pairs (2e-3); the GEMM's products are exact (+-1 times fp16)
with float32 accumulation, so it matches the reference on the same z16 to 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch

from liftq_cli.quant.whitening import kron_factors, orthogonal_init
from liftq_kernels.ops import liftq_linear
from liftq_kernels.reference import (
    bitmm_codes_ref,
    lift_codes_ref,
    lift_ref,
    liftq_linear_ref,
    pack_bits,
    pack_interleaved,
    padded_words,
    unpack_bits,
    unpack_interleaved,
    unpack_signs,
)

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from liftq_kernels.bitgemm import bitgemm  # noqa: E402  (needs triton)
from liftq_kernels.bitgemv import bitgemv  # noqa: E402
from liftq_kernels.lift import lift  # noqa: E402

LIFT_RTOL = 1e-5
GEMV_RTOL = 2e-3
GEMM_RTOL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (in_features n, D, d): 30 = 5 x 6 with d=4 (pads 2), 23 prime (1 x 23), 72 with d=10,
# 64 = 8 x 8 (Hadamard), 200 = 10 x 20 (more than one 32-tile of a factor: 20 > 16 ... and
# several tiles of the rotation grid)
SHAPES = [(30, 9, 4), (23, 24, 10), (72, 20, 10), (64, 24, 10), (1190, 16, 10)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "a kernel left NaN in its output"
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def layer(n: int, big_d: int, d: int, out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = kron_factors(n)
    s1 = torch.rand(n, generator=g) + 0.5
    s2 = torch.rand(n, generator=g) + 0.5
    p1, p2 = orthogonal_init(a, g), orthogonal_init(b, g)
    lattice = torch.randn(d, big_d, generator=g) / big_d**0.5
    k = -(-n // d) * big_d
    words = pack_interleaved(torch.rand(out, k, generator=g) > 0.5)
    scale = torch.rand(out, generator=g) + 0.1
    tensors = (words, scale.half(), s1.half(), p1.half(), p2.half(), s2.half(), lattice)
    return tuple(t.to(DEVICE) for t in tensors)


def codes(out_features: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    words = pack_interleaved(torch.rand(out_features, k, generator=g) > 0.5).to(DEVICE)
    scale = (torch.rand(out_features, generator=g) + 0.1).half().to(DEVICE)
    return g, words, scale


def test_pack_unpack_round_trip_keeps_every_bit():
    g = torch.Generator().manual_seed(1)
    for k in (1, 31, 32, 33, 95, 200):
        bits = torch.rand(7, k, generator=g) > 0.5
        bits[:, -1] = True  # the last bit of a row, bit 31 of a word when k % 32 == 0
        words = pack_bits(bits)
        assert words.dtype == torch.int32 and words.shape == (7, -(-k // 32))
        assert torch.equal(unpack_bits(words, k), bits)
        signs = unpack_signs(words, k)
        assert torch.equal(signs, bits.float() * 2 - 1)
        interleaved = pack_interleaved(bits)
        assert interleaved.shape == (7, padded_words(k)) == (7, -(-k // 32))  # short rows
        assert torch.equal(unpack_interleaved(interleaved, k), bits)
    assert int(pack_bits(torch.ones(1, 32, dtype=torch.bool))[0, 0]) == -1  # all 32 bits set
    long_row = pack_interleaved(torch.ones(2, 32 * 257, dtype=torch.bool))
    assert long_row.shape == (2, 260) and not long_row[:, 257:].any()  # 16-byte rows, zero pad


def test_interleaved_bit_order_pairs_neighbouring_elements():
    """Bit p and p + 16 of a format-2 word are elements 2p and 2p + 1 (the half2 pair)."""
    for element, position in ((0, 0), (1, 16), (2, 1), (3, 17), (30, 15), (31, 31), (32, 32)):
        bits = torch.zeros(1, 64, dtype=torch.bool)
        bits[0, element] = True
        word = pack_interleaved(bits)[0, position // 32]
        assert int(word) & 0xFFFFFFFF == 1 << (position % 32), (element, position)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "big_d", "d"), SHAPES)
def test_lift_matches_reference(n, big_d, d, dtype):
    _, _, s1, p1, p2, s2, lattice = layer(n, big_d, d, out=8)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    x[1] *= 1e4  # a row of large activations gets its own power-of-two scale
    k_padded = padded_words(-(-n // d) * big_d) * 32
    out = torch.full((3, k_padded), float("nan"), device=DEVICE, dtype=torch.float16)
    z16, z_scale = lift(x, s1, p1, p2, s2, lattice, k_padded, out=out)
    assert z16.data_ptr() == out.data_ptr()
    ref16, ref_scale = lift_codes_ref(x, s1, p1, p2, s2, lattice, k_padded)
    assert torch.equal(z_scale, ref_scale)
    assert float(z16.float().abs().max()) <= 2**11
    z = lift_ref(x, s1, p1, p2, s2, lattice)
    k = z.shape[1]
    assert torch.equal(z16[:, k:], torch.zeros_like(z16[:, k:]))  # the padding is zero
    lifted = z16[:, :k].float() * z_scale[:, None]
    for r in range(3):
        assert rel_err(lifted[r], z[r]) < 2**-11 + LIFT_RTOL


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("out_features", "k"), [(37, 108), (5, 33), (70, 1000), (16, 4096), (9, 32 * 257)]
)
def test_bitgemv_matches_reference(out_features, k, rows):
    g, words, scale = codes(out_features, k, seed=3)
    z16 = torch.zeros(rows, words.shape[1] * 32, dtype=torch.float16)
    z16[:, :k] = torch.randn(rows, k, generator=g).half() * 100
    z16, z_scale = z16.to(DEVICE), (2.0 ** torch.arange(rows).float()).to(DEVICE)
    out = torch.full((rows, out_features), float("nan"), device=DEVICE, dtype=torch.float32)
    y = bitgemv(z16, z_scale, words, scale, out_dtype=torch.float32, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, bitmm_codes_ref(z16, z_scale, words, scale)) < GEMV_RTOL


def test_bitgemv_split_k_reduces_every_range(monkeypatch):
    """Several K ranges (split-K partials plus the reduce kernel) give the one-range result."""
    import liftq_kernels.autotune as autotune

    g, words, scale = codes(20, 3000, seed=7)
    z16 = torch.randn(1, words.shape[1] * 32, generator=g).half().to(DEVICE)
    z_scale = torch.ones(1, device=DEVICE)
    whole = bitgemv(z16, z_scale, words, scale, out_dtype=torch.float32)
    monkeypatch.setattr(autotune, "GEMV_MIN_SPLIT_WORDS", 4)
    plan = autotune.gemv_plan(1, 20, words.shape[1])
    assert plan.splits > 1
    split = bitgemv(z16, z_scale, words, scale, out_dtype=torch.float32)
    assert rel_err(split, whole) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("rows", "out_features", "k"), [(40, 37, 108), (17, 70, 200), (17, 9, 99)])
def test_bitgemm_matches_reference(rows, out_features, k, dtype):
    g, words, scale = codes(out_features, k, seed=4)
    z16 = torch.zeros(rows, words.shape[1] * 32, dtype=torch.float16)
    z16[:, :k] = torch.randn(rows, k, generator=g).half()
    z16, z_scale = z16.to(DEVICE), (torch.rand(rows, generator=g) + 0.5).to(DEVICE)
    out = torch.full((rows, out_features), float("nan"), device=DEVICE, dtype=dtype)
    y = bitgemm(z16, z_scale, words, scale, out_dtype=dtype, out=out)
    assert y.data_ptr() == out.data_ptr()
    bound = GEMM_RTOL if dtype == torch.float32 else 1e-3  # + fp16 rounding of the output
    assert rel_err(y, bitmm_codes_ref(z16, z_scale, words, scale)) < bound


@pytest.mark.parametrize("rows", [1, 4, 20])  # decode path (1 and 4 rows), prefill path
@pytest.mark.parametrize(("n", "big_d", "d"), SHAPES)
def test_triton_layer_matches_torch_path(n, big_d, d, rows):
    params = layer(n, big_d, d, out=45, seed=5)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ref = liftq_linear_ref(x, *params)
    fast = liftq_linear(x, *params, backend="triton")
    slow = liftq_linear(x, *params, backend="torch")
    assert fast.dtype == slow.dtype == torch.float32
    assert rel_err(fast, ref) < GEMV_RTOL  # fp16 activation inside the kernels
    assert rel_err(slow, ref) < LIFT_RTOL
    half = liftq_linear(x.half(), *params, backend="triton")
    assert half.dtype == torch.float16 and rel_err(half, ref) < 3e-3


def test_launchers_reject_mismatched_codes():
    _, words, scale = codes(6, 72, seed=8)  # 72 bits: 3 words, padded to 4
    z16 = torch.zeros(1, 100, device=DEVICE, dtype=torch.float16)
    ones = torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="need z with 32 x as many columns"):
        bitgemv(z16, ones, words, scale)
    z16 = torch.zeros(1, 128, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="int32"):
        bitgemm(z16, ones, words.float(), scale)
    with pytest.raises(ValueError, match="z float16"):
        bitgemv(z16.float(), ones, words, scale)
    *_, s1, p1, p2, s2, lattice = layer(30, 9, 4, out=6)
    with pytest.raises(ValueError, match="k_padded=64 must be a multiple of 32 holding K"):
        lift(torch.zeros(1, 30, device=DEVICE), s1, p1, p2, s2, lattice, 64)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("rows", [1, 32])
def test_a_layer_replays_from_a_cuda_graph(rows):
    """No autotuning, host sync or allocation outside the pool inside a warmed-up step."""
    params = layer(1190, 24, 10, out=300, seed=9)
    x = torch.randn(rows, 1190, device=DEVICE, dtype=torch.float16)
    eager = liftq_linear(x, *params)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = liftq_linear(x, *params)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, liftq_linear(x, *params))
    assert not torch.equal(captured, eager)
