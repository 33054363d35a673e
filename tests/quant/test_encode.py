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


def _output_error(q: QuantizedLinear, weight: torch.Tensor, gram: torch.Tensor) -> float:
    err = q.dequantize().double() - weight.double()
    return float(((err @ gram.double()) * err).sum())


def test_flip_margins_predict_every_single_flip_exactly():
    """margin_j = Delta_j / (4 s^2 c_j): the output-error change tr(E H E^T) of flipping bit j
    alone, recomputed from the weights, matches the margin's prediction for every bit (with
    LDLQ's Gram metric, and without one), and a bit with margin < 0 really lowers the error."""
    from liftq_cli.quant.encode import flip_margins
    from liftq_cli.quant.ldlq import whitened_hessian
    from liftq_cli.quant.whitening import whiten_weight

    cfg, matrix = LatticeConfig(8, 4), tiny_matrix(8, 4)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 10, generator=g)  # 10: 3 slices of d = 4, the last one padded
    x = torch.randn(64, 10, generator=g) * torch.linspace(0.2, 3.0, 10)
    gram = x.T @ x
    wh = init_whitening(10, x.abs().mean(0), alpha=0.5, seed=1)
    for metric_gram in (gram, None):
        q = quantize_linear(w, wh, cfg, matrix, brute_force_encode, gram=metric_gram)
        assert q.margin is not None and q.margin.shape == q.codes.shape
        used = gram if metric_gram is not None else None
        hessian = None if used is None else whitened_hessian(used, wh).float()
        margins = flip_margins(q, whiten_weight(w, wh), hessian)
        assert torch.allclose(margins, q.margin)
        # the same check in the original basis: identity metric in the whitened basis is
        # H = T^-T T^-1 there
        eye = torch.eye(10)
        basis = gram if used is not None else whiten_weight(eye, wh) @ whiten_weight(eye, wh).T
        norm = float((hessian if hessian is not None else eye).diagonal().mean())
        base = _output_error(q, w, basis)
        matrix64 = q.matrix.double()
        for o, k, j in itertools.product(range(3), range(3), range(8)):
            codes = q.codes.clone()
            codes[o, k, j] = ~codes[o, k, j]
            flipped = QuantizedLinear(cfg, 10, codes, q.scale, q.whitening, q.matrix)
            delta = _output_error(flipped, w, basis) - base
            # c_kj: m_j^T H'_kk m_j over the slice's real coordinates
            lo, hi = 4 * k, min(4 * k + 4, 10)
            h = (hessian if hessian is not None else eye)[lo:hi, lo:hi].double() / norm
            m = matrix64[: hi - lo, j]
            quad = 4 * float(q.scale[o]) ** 2 * float(m @ h @ m) * norm
            assert abs(delta - quad * float(margins[o, k, j])) < 1e-6 * max(1.0, abs(base))
            if margins[o, k, j] < 0:
                assert delta < 0
