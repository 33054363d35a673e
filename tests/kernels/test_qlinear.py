"""The int8 / int4 lm_head kernel against its float32 reference, built from the same codes.

Under TRITON_INTERPRET=1 on CPU, on the GPU on a CUDA machine. Shapes are odd on purpose: K not
a multiple of the block (int8) or of the group, odd K (a padded high nibble), N not a multiple
of BLOCK_N. Outputs are pre-filled with NaN so a skipped store fails. Bounds: float32 is limited
by summation order (1e-5), float16 / bfloat16 by the rounding of the stored result.
The quantizers' invariants (pack then unpack is exact, error within half a step) run on torch.
"""

from __future__ import annotations

import os

import pytest
import torch

from liftq_kernels.qlinear_ops import qlinear
from liftq_kernels.qlinear_ref import (
    dequantize,
    qlinear_ref,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# (rows of x, N, K, group): K = 131 odd and past one int8 block, 200 not a multiple of 128,
# 48 below one group, 130 with group 64 (three groups, the last of 2 columns)
SHAPES = [(1, 67, 131, 128), (3, 130, 200, 128), (2, 64, 48, 128), (5, 17, 130, 64)]


def needs_triton() -> None:
    pytest.importorskip("triton")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "a kernel left NaN in its output"
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def matrix(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = 0  # an all-zero row: scale 0, codes 0
    return w


@pytest.mark.parametrize(("rows", "n", "k", "group"), SHAPES)
def test_int8_round_trip_is_within_half_a_step(rows, n, k, group):
    w = matrix(n, k)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and tuple(s.shape) == (n,)
    assert int(q.abs().max()) <= 127 and not q[0].any() and float(s[0]) == 0
    err = (dequantize(q, s, k) - w).abs()
    assert bool((err <= s.float()[:, None] / 2 + 1e-6 * w.abs()).all())
    again_q, again_s = quantize_int8(dequantize(q, s, k))
    assert torch.equal(again_q, q) and torch.equal(again_s, s)  # a fixed point


@pytest.mark.parametrize(("rows", "n", "k", "group"), SHAPES)
def test_int4_pack_then_unpack_is_exact_and_within_half_a_step(rows, n, k, group):
    w = matrix(n, k)
    q, s = quantize_int4(w, group)
    groups = -(-k // group)
    assert q.dtype == torch.uint8 and tuple(q.shape) == (n, -(-k // 2))
    assert tuple(s.shape) == (n, groups) and s.dtype == torch.float16
    codes = unpack_int4(q, k)
    assert int(codes.abs().max()) <= 7 and not codes[0].any()
    if k % 2:
        assert bool(((q[:, -1] >> 4) == 8).all())  # the padded nibble holds q = 0
    step = s.float().repeat_interleave(group, dim=1)[:, :k]
    assert bool(((dequantize(q, s, k, group) - w).abs() <= step / 2 + 1e-6).all())
    again_q, again_s = quantize_int4(dequantize(q, s, k, group), group)
    assert torch.equal(again_q, q) and torch.equal(again_s, s)


def test_int4_nibble_order_low_is_the_even_column():
    w = torch.tensor([[7.0, -7.0, 1.0]])  # group 128: one scale 1.0
    q, s = quantize_int4(w)
    assert float(s[0, 0]) == 1.0
    assert q.tolist() == [[(7 + 8) | ((-7 + 8) << 4), (1 + 8) | (8 << 4)]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("rows", "n", "k", "group"), SHAPES)
def test_qlinear_matches_the_reference(backend, bits, rows, n, k, group):
    if backend == "triton":
        needs_triton()
    w = matrix(n, k, seed=bits)
    q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, group)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    ref = qlinear_ref(x, q, s, group)
    q, s, x = q.to(DEVICE), s.to(DEVICE), x.to(DEVICE)
    for dtype, rtol in RTOL.items():
        y = qlinear(x.to(dtype), q, s, group, backend=backend)
        assert y.dtype == dtype and tuple(y.shape) == (rows, n)
        # the reference from the same x rounded to dtype
        ref_d = qlinear_ref(x.to(dtype).cpu(), q.cpu(), s.cpu(), group)
        assert rel_err(y.cpu(), ref_d) < rtol, (dtype, rel_err(y.cpu(), ref_d))
    assert rel_err(qlinear(x, q, s, group, backend=backend).cpu(), ref) < 1e-5


def test_triton_kernel_writes_every_output():
    needs_triton()
    from liftq_kernels.qlinear import qgemv

    for bits in (8, 4):
        w = matrix(67, 131, seed=3)
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w)
        x = torch.randn(3, 131, generator=torch.Generator().manual_seed(2))
        out = torch.full((3, 67), float("nan"), device=DEVICE)
        y = qgemv(x.to(DEVICE), q.to(DEVICE), s.to(DEVICE), out=out)
        assert y.data_ptr() == out.data_ptr()
        assert rel_err(y.cpu(), qlinear_ref(x, q, s)) < 1e-5


@pytest.mark.parametrize(
    ("q", "s", "group", "fragment"),
    [
        (torch.zeros(4, 9, dtype=torch.int8), torch.zeros(4), 128, "need [N, 10] and [N]"),
        (torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(4, 1), 128, "need [N, 5]"),
        (torch.zeros(4, 5, dtype=torch.uint8), torch.zeros(4, 1), 96, "power of two"),
        (torch.zeros(4, 10, dtype=torch.int32), torch.zeros(4), 128, "int8 or uint8"),
    ],
)
def test_qlinear_refuses_bad_shapes(q, s, group, fragment):
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        qlinear(torch.zeros(2, 10), q, s, group, backend="torch")
