"""quant/ldlq.py: LDLQ error feedback never hurts the output error it targets, and with no
correlation between inputs it is plain slice-by-slice encoding."""

from __future__ import annotations

import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix

from liftq_cli.quant.encode import slice_rows
from liftq_cli.quant.ldlq import ldlq_encode, whitened_hessian
from liftq_cli.quant.whitening import Whitening


def output_error(target, codes, matrix, hessian) -> float:
    approx = ((codes.float() * 2 - 1) @ matrix.T).reshape(target.shape[0], -1)
    err = (target - approx[:, : target.shape[1]]).double()
    return float(torch.einsum("oi,ij,oj->", err, hessian.double(), err))


def test_a_diagonal_hessian_gives_the_plain_encoding():
    matrix = tiny_matrix(8, 4)
    target = torch.randn(10, 16, generator=torch.Generator().manual_seed(0))
    plain = brute_force_encode(slice_rows(target, 4), matrix)
    fed = ldlq_encode(target, torch.diag(torch.rand(16) + 0.5), matrix, brute_force_encode)
    assert torch.equal(fed, plain)


def test_feedback_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    matrix = tiny_matrix(8, 4)
    target = torch.randn(64, 16, generator=g)
    mix = torch.randn(16, 16, generator=g)
    x = torch.randn(512, 16, generator=g) @ (torch.eye(16) + 0.8 * mix)  # correlated inputs
    hessian = (x.T @ x / x.shape[0]).double()
    plain = brute_force_encode(slice_rows(target, 4), matrix)
    fed = ldlq_encode(target, hessian, matrix, brute_force_encode)
    before = output_error(target, plain, matrix, hessian)
    after = output_error(target, fed, matrix, hessian)
    assert after < 0.9 * before, (before, after)


def test_the_whitened_hessian_is_t_inverse_h_t_inverse_transposed():
    n = 12
    g = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    wh = Whitening(torch.rand(n, generator=g) + 0.5, q1, q2, torch.rand(n, generator=g) + 0.5)
    x = torch.randn(64, n, generator=g)
    gram = x.T @ x
    h = whitened_hessian(gram, wh)
    # the output error of a whitened-basis error E' is tr(E' H' E'^T) = tr(E H E^T), E = E' T^-1
    from liftq_cli.quant.whitening import unwhiten_weight

    e_white = torch.randn(5, n, generator=g).double()
    e = unwhiten_weight(e_white.float(), wh).double()
    lhs = torch.einsum("oi,ij,oj->", e_white, h, e_white)
    rhs = torch.einsum("oi,ij,oj->", e, gram.double(), e)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)
