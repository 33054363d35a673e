"""The torch path (CPU fallback): byte lookup tables and unpacking agree with the reference."""

from __future__ import annotations

import pytest
import torch

from liftq_kernels.autotune import LUT_MAX_ROWS
from liftq_kernels.ops import liftq_linear, lut_bitmm, pick_backend
from liftq_kernels.reference import bitmm_ref, liftq_linear_ref, pack_bits, pack_interleaved


@pytest.mark.parametrize(("rows", "out_features", "k"), [(1, 37, 108), (3, 5, 33), (2, 9, 256)])
def test_lookup_tables_match_the_reference(rows, out_features, k):
    g = torch.Generator().manual_seed(0)
    words = pack_bits(torch.rand(out_features, k, generator=g) > 0.5)
    scale = torch.rand(out_features, generator=g).half()
    z = torch.randn(rows, k, generator=g)
    ref = bitmm_ref(z, words, scale)
    assert float((lut_bitmm(z, words, scale) - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("rows", [1, LUT_MAX_ROWS + 1, 40])
def test_torch_linear_matches_the_reference_on_both_sides_of_the_switch(rows, monkeypatch):
    monkeypatch.delenv("LIFTQ_BACKEND", raising=False)
    g = torch.Generator().manual_seed(1)
    n, big_d, d, out = 30, 9, 4, 11  # 30 = 5 x 6, d = 4 pads 2, 72 bits per row
    p1, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    p2, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    params = (
        pack_interleaved(torch.rand(out, 72, generator=g) > 0.5),
        torch.rand(out, generator=g).half(),
        (torch.rand(n, generator=g) + 0.5).half(),
        p1.half(),
        p2.half(),
        (torch.rand(n, generator=g) + 0.5).half(),
        torch.randn(d, big_d, generator=g).half(),
    )
    x = torch.randn(rows, n, generator=g)
    ref = liftq_linear_ref(x, *params)
    y = liftq_linear(x, *params, backend="torch")
    assert float((y - ref).norm() / ref.norm()) < 1e-5
    assert pick_backend(x) == "torch"  # CPU tensors never take the Triton path by default
    with pytest.raises(ValueError, match=r"x must be \[B, 30\]"):
        liftq_linear(x[:, :29], *params)
