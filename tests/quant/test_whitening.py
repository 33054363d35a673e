import pytest
import torch

from liftq_cli.quant.whitening import (
    Whitening,
    fit_whitening,
    kron_factors,
    lift_activation,
    orthogonal_init,
    proxy_error,
    unwhiten_weight,
    whiten_weight,
)


@pytest.mark.parametrize(
    ("n", "pair"),
    [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (11008, (86, 128)), (7, (1, 7))],
)
def test_kron_factors(n, pair):
    assert kron_factors(n) == pair


@pytest.mark.parametrize("size", [1, 8, 24, 48, 64])
def test_orthogonal_init_is_orthogonal_and_seeded(size):
    p = orthogonal_init(size, torch.Generator().manual_seed(0))
    assert torch.allclose(p @ p.T, torch.eye(size), atol=1e-5)
    assert torch.equal(p, orthogonal_init(size, torch.Generator().manual_seed(0)))
    if size >= 8:  # incoherent: no entry dominates
        assert float(p.abs().max()) <= 2.0 / size**0.5


@pytest.mark.parametrize("n", [576, 96, 64])
def test_whitening_is_an_exact_identity(n):
    g = torch.Generator().manual_seed(1)
    a, b = kron_factors(n)
    wh = Whitening(
        torch.rand(n, generator=g) + 0.5,
        orthogonal_init(a, g),
        orthogonal_init(b, g),
        torch.rand(n, generator=g) + 0.5,
    )
    w = torch.randn(16, n, generator=g)
    x = torch.randn(5, n, generator=g)
    assert torch.allclose(lift_activation(x, wh) @ whiten_weight(w, wh).T, x @ w.T, atol=1e-4)
    assert torch.allclose(unwhiten_weight(whiten_weight(w, wh), wh), w, atol=1e-5)


def test_fitting_cuts_the_proxy_error_on_outliers():
    g = torch.Generator().manual_seed(0)
    n = 576
    w = torch.randn(128, n, generator=g)
    w[:, 3] *= 20  # an outlier input channel in the weight
    x = torch.randn(1000, n, generator=g)
    x[:, 7] *= 10  # and one in the activations
    gram = x.T @ x
    identity = Whitening(torch.ones(n), torch.eye(24), torch.eye(24), torch.ones(n))
    plain = float(proxy_error(w, identity, gram / gram.diagonal().mean(), 2.4))
    wh, fitted = fit_whitening(w, gram, x.abs().mean(0), bits=2.4, steps=30)
    assert fitted < 0.3 * plain
    assert torch.allclose(wh.p1 @ wh.p1.T, torch.eye(24), atol=1e-5)


def test_trained_rotations_stay_orthogonal_and_never_raise_the_proxy_error():
    """rotations='trained' (Cayley-parametrised P1, P2, trained with s1, s2): the factors are
    still orthogonal, they moved off the Hadamard start, the whitening is still an exact
    identity, and the proxy error is no higher than with the fixed rotations."""
    from liftq_cli.quant.whitening import lift_activation

    g = torch.Generator().manual_seed(3)
    n = 32
    weight = torch.randn(48, n, generator=g)
    x = torch.randn(256, n, generator=g) * torch.linspace(0.1, 4.0, n)
    gram, act = x.T @ x, x.abs().mean(0)
    fixed, err_fixed = fit_whitening(weight, gram, act, 2.4, steps=30, alphas=(0.0,))
    trained, err_trained = fit_whitening(
        weight, gram, act, 2.4, steps=30, alphas=(0.0,), rotations="trained"
    )
    assert err_trained <= err_fixed
    for p, p0 in ((trained.p1, fixed.p1), (trained.p2, fixed.p2)):
        assert torch.allclose(p @ p.T, torch.eye(p.shape[0]), atol=1e-5)
        assert not torch.allclose(p, p0, atol=1e-4)
    v = torch.randn(5, n, generator=g)
    out = (whiten_weight(weight, trained) @ lift_activation(v, trained).T).T
    torch.testing.assert_close(out, v @ weight.T, rtol=1e-4, atol=1e-4)
