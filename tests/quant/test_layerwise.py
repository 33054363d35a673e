import itertools

import torch

from liftq_cli.quant.block_correction import CorrectableLinear, CorrectionConfig, correct_block
from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.layerwise import QuantizedLinear, quantize_linear, slice_rows
from liftq_cli.quant.whitening import Whitening, init_whitening, kron_factors, orthogonal_init


def brute_force_encode(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Exhaustive nearest codeword (tiny D only): independent of the lattice module."""
    D = matrix.shape[1]
    codebook = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=D)))
    points = codebook @ matrix.T
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
    back = QuantizedLinear.from_state(q.state("x."), "x.", cfg, matrix)
    assert torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_row_scale_is_least_squares():
    cfg = LatticeConfig(8, 4)
    matrix = tiny_matrix(8, 4)
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    wh = Whitening(torch.ones(16), torch.eye(4), torch.eye(4), torch.ones(16))
    q = quantize_linear(w, wh, cfg, matrix, brute_force_encode)
    base = q.whitened()
    for factor in (0.9, 1.1):
        q.scale *= factor
        worse = float((q.whitened() - w).pow(2).sum())
        q.scale /= factor
        assert worse > float((base - w).pow(2).sum())


def test_block_correction_reduces_the_block_error():
    torch.manual_seed(0)
    cfg = LatticeConfig(8, 4)
    matrix = tiny_matrix(8, 4)
    n = 32
    lin1, lin2 = torch.nn.Linear(n, 48, bias=False), torch.nn.Linear(48, n, bias=False)
    x = torch.randn(16, 10, n)
    with torch.no_grad():
        target = lin2(torch.relu(lin1(x)))
    modules = []
    for lin in (lin1, lin2):
        k = lin.in_features
        a, b = kron_factors(k)
        g = torch.Generator().manual_seed(0)
        wh = Whitening(torch.ones(k), orthogonal_init(a, g), orthogonal_init(b, g), torch.ones(k))
        q = quantize_linear(lin.weight.detach(), wh, cfg, matrix, brute_force_encode)
        modules.append(CorrectableLinear(q, None, latent_init=0.05))
    block = torch.nn.Sequential(modules[0], torch.nn.ReLU(), modules[1])
    result = correct_block(
        block, x, target, lambda m, h: m(h), CorrectionConfig(steps=150, batch=4)
    )
    assert result.mse_after < 0.8 * result.mse_before
    assert 0 < result.flipped < 0.5
    exported = modules[0].export()
    with torch.no_grad():
        assert torch.allclose(exported.dequantize(), modules[0].weight(), atol=1e-5)
