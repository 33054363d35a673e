"""Triton kernels against their float32 torch references, built from the same codes.

On CPU these run under TRITON_INTERPRET=1 (`make test` sets it); on a CUDA machine they run
on the GPU. Shapes are odd on purpose: in/out features that are not multiples of the block
sizes, d not dividing in_features, K not a multiple of 32. Outputs are pre-filled with NaN so
a skipped store fails. Bounds are relative Frobenius errors per output dtype: float32 is
limited by summation order (1e-5), float16 / bfloat16 by the rounding of the stored result
(2^-11 and 2^-8 relative per element).
"""

from __future__ import annotations

import os

import pytest
import torch

from liftq_cli.quant.whitening import kron_factors, orthogonal_init
from liftq_kernels.ops import liftq_linear
from liftq_kernels.reference import (
    bitmm_ref,
    lift_ref,
    liftq_linear_ref,
    pack_bits,
    unpack_bits,
    unpack_signs,
)

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from liftq_kernels.bitgemm import bitgemm  # noqa: E402  (needs triton)
from liftq_kernels.bitgemv import bitgemv  # noqa: E402
from liftq_kernels.lift import lift  # noqa: E402

RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = list(RTOL)
# (in_features n, D, d): 30 = 5 x 6 with d=4 (pads 2), 23 prime (factors 1 x 23), 72 with d=10
SHAPES = [(30, 9, 4), (23, 24, 10), (72, 20, 10)]


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
    words = pack_bits(torch.rand(out, k, generator=g) > 0.5)
    scale = torch.rand(out, generator=g) + 0.1
    tensors = (words, scale.half(), s1.half(), p1.half(), p2.half(), s2.half(), lattice.half())
    return tuple(t.to(DEVICE) for t in tensors)


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
    assert int(pack_bits(torch.ones(1, 32, dtype=torch.bool))[0, 0]) == -1  # all 32 bits set


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "big_d", "d"), SHAPES)
def test_lift_matches_reference(n, big_d, d, dtype):
    words, scale, s1, p1, p2, s2, lattice = layer(n, big_d, d, out=8)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    k = -(-n // d) * big_d
    out = torch.full((3, k), float("nan"), device=DEVICE)
    z = lift(x, s1, p1, p2, s2, lattice, out=out)
    assert z.data_ptr() == out.data_ptr()
    ref = lift_ref(x, s1, p1, p2, s2, lattice)
    assert rel_err(z, ref) < RTOL[torch.float32]  # float32 math on the same (rounded) inputs
    z_low = lift(x, s1, p1, p2, s2, lattice, z_dtype=dtype)
    assert z_low.dtype == dtype and rel_err(z_low, ref) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_features", "k"), [(37, 108), (5, 33), (70, 1000)])
def test_bitgemv_matches_reference(out_features, k, dtype):
    g = torch.Generator().manual_seed(3)
    words = pack_bits(torch.rand(out_features, k, generator=g) > 0.5).to(DEVICE)
    scale = (torch.rand(out_features, generator=g) + 0.1).half().to(DEVICE)
    z = torch.randn(3, k, generator=g).to(DEVICE, dtype)
    out = torch.full((3, out_features), float("nan"), device=DEVICE, dtype=dtype)
    y = bitgemv(z, words, scale, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, bitmm_ref(z, words, scale)) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "out_features", "k"), [(40, 37, 108), (17, 70, 200)])
def test_bitgemm_matches_reference(rows, out_features, k, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("Triton's interpreter gets bf16 tl.dot wrong (numpy has no bf16); GPU only")
    g = torch.Generator().manual_seed(4)
    words = pack_bits(torch.rand(out_features, k, generator=g) > 0.5).to(DEVICE)
    scale = (torch.rand(out_features, generator=g) + 0.1).half().to(DEVICE)
    z = torch.randn(rows, k, generator=g).to(DEVICE, dtype)
    out = torch.full((rows, out_features), float("nan"), device=DEVICE, dtype=dtype)
    y = bitgemm(z, words, scale, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert rel_err(y, bitmm_ref(z, words, scale)) < RTOL[dtype]


@pytest.mark.parametrize("rows", [1, 20])  # decode path, prefill path
@pytest.mark.parametrize(("n", "big_d", "d"), SHAPES)
def test_triton_layer_matches_torch_path(n, big_d, d, rows):
    params = layer(n, big_d, d, out=45, seed=5)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    ref = liftq_linear_ref(x, *params)
    fast = liftq_linear(x, *params, backend="triton")
    slow = liftq_linear(x, *params, backend="torch")
    assert fast.dtype == slow.dtype == torch.float32
    assert rel_err(fast, ref) < RTOL[torch.float32]
    assert rel_err(slow, ref) < RTOL[torch.float32]
    half = liftq_linear(x.half(), *params, backend="triton")
    assert half.dtype == torch.float16 and rel_err(half, ref) < 2e-3


def test_launchers_reject_mismatched_codes():
    words, scale, *_ = layer(30, 9, 4, out=6)
    z = torch.randn(1, 100, device=DEVICE)  # 100 bits need 4 words; layer has 3 (72 bits)
    with pytest.raises(ValueError, match="words has 3 columns"):
        bitgemv(z, words, scale)
    with pytest.raises(ValueError, match="int32"):
        bitgemm(torch.randn(1, 72, device=DEVICE), words.float(), scale)
