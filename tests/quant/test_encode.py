"""Encoding one linear (quant/encode.py, quant/ldlq.py): slicing, codes, row scales, LDLQ."""

import itertools

import torch

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.encode import quantize_linear, slice_rows
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quant.whitening import Whitening, init_whitening


def brute_force_encode(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Exhaustive nearest codeword (tiny D only): independent of the lattice module."""
    D = matrix.shape[1]
    codebook = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=D)), device=x.device)
    points = codebook @ matrix.to(x.device).T
    flat = x.reshape(-1, x.shape[-1])
    best = torch.cdist(flat, points).argmin(dim=1)
    return codebook[best].reshape(*x.shape[:-1], D) > 0


def tiny_matrix(D: int, d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, d, generator=torch.Generator().manual_seed(0)))
    return q.T.contiguous()  # [d, D], orthonormal rows


def test_slice_rows_pads_with_zeros():
    rows = torch.arange(1, 8, dtype=torch.float32).view(1, 7)
    assert slice_rows(rows, 3).tolist() == [[[1, 2, 3], [4, 5, 6], [7, 0, 0]]]


def test_quantize_linear_state_round_trip_and_error():
    cfg = LatticeConfig(8, 4)
    matrix = tiny_matrix(8, 4)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 30, generator=g)  # 30 is not a multiple of d = 4
    wh = init_whitening(30, torch.ones(30), alpha=0.0, seed=0)
    q = quantize_linear(w, wh, cfg, matrix, brute_force_encode)
    assert q.codes.shape == (24, 8, 8) and q.codes.dtype == torch.bool
    rel = float((q.dequantize() - w).pow(2).sum() / w.pow(2).sum())
    assert 0.05 < rel < 0.45  # 2 bits per weight on a Gaussian matrix
    back = QuantizedLinear.from_state(q.state(), cfg, matrix)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_row_scale_is_least_squares():
    cfg = LatticeConfig(8, 4)
    matrix = tiny_matrix(8, 4)
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    wh = Whitening(torch.ones(16), torch.eye(4), torch.eye(4), torch.ones(16))
    q = quantize_linear(w, wh, cfg, matrix, brute_force_encode)
    base = q.dequantize()  # identity whitening: the whitened approximation itself
    for factor in (0.9, 1.1):
        q.scale *= factor
        worse = float((q.dequantize() - w).pow(2).sum())
        q.scale /= factor
        assert worse > float((base - w).pow(2).sum())
