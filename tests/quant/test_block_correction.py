"""Block correction: the straight-through sign, `CorrectableLinear` and `correct_block`.

The quantized linears come from the public `quantize_linear` with a tiny LQ-8/4 lattice and
an exhaustive encoder, so every code is exact and every test runs in well under a second.
"""

from __future__ import annotations

import pytest
import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block, ste_sign
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quant.whitening import Whitening, kron_factors, orthogonal_init
from liftq_cli.quantize_job import CorrectionConfig

CFG = LatticeConfig(8, 4)
MATRIX = tiny_matrix(8, 4)
TRAINED = ("latent", "scale", "log_s1", "log_s2")


def _quantized(weight: torch.Tensor, seed: int) -> QuantizedLinear:
    """Encode `weight` with a whitening whose four factors are all non-trivial."""
    n = weight.shape[1]
    a, b = kron_factors(n)
    g = torch.Generator().manual_seed(seed)
    s1, s2 = torch.rand(n, generator=g) + 0.5, torch.rand(n, generator=g) + 0.5
    wh = Whitening(s1, orthogonal_init(a, g), orthogonal_init(b, g), s2)
    return quantize_linear(weight, wh, CFG, MATRIX, brute_force_encode)


def _random_quantized(out: int, inp: int, seed: int) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    return _quantized(torch.randn(out, inp, generator=g), seed)


def test_ste_sign_forward_is_sign_with_zero_mapped_to_plus_one():
    latent = torch.tensor([-3.0, -1.0, -0.25, -0.0, 0.0, 1e-8, 0.5, 1.0, 3.0])
    out = ste_sign(latent)
    assert out.dtype == torch.float32 and out.shape == latent.shape
    assert out.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1, 1]


def test_ste_sign_gradient_passes_inside_the_unit_interval_only():
    latent = torch.tensor([-3.0, -1.0001, -1.0, -0.3, 0.0, 0.7, 1.0, 1.0001, 5.0])
    latent.requires_grad_(True)
    upstream = torch.arange(1.0, 10.0)  # distinct per element: a constant gradient would fail
    (ste_sign(latent) * upstream).sum().backward()
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32)
    assert torch.equal(latent.grad, upstream * inside)


def test_weight_and_forward_equal_the_quantized_layer_at_init():
    q = _random_quantized(12, 18, seed=1)  # 18 = 4 slices + 2 padded columns; 18 = 3 x 6
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(12, generator=g)
    m = CorrectableLinear(q, bias, latent_init=0.05)
    assert torch.equal(m.latent.detach(), q.signs() * 0.05)
    with torch.no_grad():
        torch.testing.assert_close(m.weight(), q.dequantize(), rtol=1e-5, atol=1e-6)
        x = torch.randn(3, 5, 18, generator=g)
        expected = nn.functional.linear(x, q.dequantize(), bias)
        torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
    trainable = {name for name, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(TRAINED)  # the bias is carried, not trained


def test_gradient_reaches_codes_scales_and_both_whitening_scales():
    q = _random_quantized(6, 8, seed=2)
    m = CorrectableLinear(q, None, latent_init=0.05)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    (m(x) ** 2).sum().backward()
    for name in TRAINED:
        grad = getattr(m, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name


def test_export_at_init_returns_the_quantized_layer():
    q = _random_quantized(12, 18, seed=3)
    m = CorrectableLinear(q, None, latent_init=0.05)
    e = m.export()
    assert e.cfg == q.cfg and e.in_features == q.in_features == 18
    assert e.codes.dtype == torch.bool and torch.equal(e.codes, q.codes)
    assert torch.equal(e.scale, q.scale)
    assert torch.equal(e.whitening.p1, q.whitening.p1)
    assert torch.equal(e.whitening.p2, q.whitening.p2)
    assert torch.equal(e.matrix, q.matrix)
    # s1, s2 are trained as logs: exp(log s) comes back within float32 rounding
    torch.testing.assert_close(e.whitening.s1, q.whitening.s1, rtol=1e-6, atol=0)
    torch.testing.assert_close(e.whitening.s2, q.whitening.s2, rtol=1e-6, atol=0)
    torch.testing.assert_close(e.dequantize(), q.dequantize(), rtol=1e-5, atol=1e-6)


def test_export_captures_the_trained_state_as_independent_copies():
    q = _random_quantized(12, 18, seed=4)
    original_scale = q.scale.clone()
    m = CorrectableLinear(q, None, latent_init=0.05)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.latent.copy_(torch.randn(m.latent.shape, generator=g))
        m.scale.mul_(1.5)
        m.log_s1.add_(0.1 * torch.randn(18, generator=g))
        m.log_s2.sub_(0.2)
    assert torch.equal(q.scale, original_scale)  # the module never wrote into its source
    e = m.export()
    assert torch.equal(e.codes, m.latent.detach() >= 0)
    assert torch.equal(e.scale, m.scale.detach())
    assert torch.equal(e.whitening.s1, m.log_s1.detach().exp())
    assert torch.equal(e.whitening.s2, m.log_s2.detach().exp())
    assert not any(t.requires_grad for t in (e.scale, e.whitening.s1, e.whitening.s2))
    with torch.no_grad():
        torch.testing.assert_close(e.dequantize(), m.weight(), rtol=1e-5, atol=1e-6)
        snapshot = e.scale.clone(), e.whitening.s1.clone()
        m.scale.mul_(2)
        m.log_s1.add_(1)
    assert torch.equal(e.scale, snapshot[0]) and torch.equal(e.whitening.s1, snapshot[1])


class _Setup:
    """Linear(16->24)+bias, ReLU, Linear(24->16) quantized, then a full-precision head."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        w1, b1 = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
        w2 = torch.randn(16, 24, generator=g) / 5
        self.head = nn.Linear(16, 8)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(8, 16, generator=g) / 4)
            self.head.bias.copy_(torch.randn(8, generator=g))
        self.head_state = {k: v.clone() for k, v in self.head.state_dict().items()}
        self.linears = [
            CorrectableLinear(_quantized(w1, 6), b1, latent_init=0.05),
            CorrectableLinear(_quantized(w2, 7), None, latent_init=0.05),
        ]
        self.block = nn.Sequential(self.linears[0], nn.ReLU(), self.linears[1], self.head)
        self.inputs = torch.randn(5, 3, 16, generator=g)  # 5 samples: the last batch is short
        self.weights = (w1, b1, w2)
        self.targets = self.targets_for(self.inputs)
        self.codes = [m.export().codes for m in self.linears]
        self.params = {n: p.detach().clone() for n, p in self.block.named_parameters()}

    def targets_for(self, inputs: torch.Tensor) -> torch.Tensor:
        """The block's output with full-precision linears."""
        w1, b1, w2 = self.weights
        with torch.no_grad():
            hidden = torch.relu(nn.functional.linear(inputs, w1, b1))
            return self.head(nn.functional.linear(hidden, w2))

    def mse(self) -> float:
        with torch.no_grad():
            return float((self.block(self.inputs) - self.targets).pow(2).mean())

    def flipped(self) -> float:
        now = [m.export().codes for m in self.linears]
        changed = sum(int((a != b).sum()) for a, b in zip(now, self.codes, strict=True))
        return changed / sum(c.numel() for c in self.codes)

    def assert_frozen_head(self) -> None:
        for name, value in self.head.state_dict().items():
            assert torch.equal(value, self.head_state[name]), name
        assert not any(p.requires_grad for p in self.block.parameters())


def test_correction_lowers_the_error_and_reports_it_truly():
    setup = _Setup()
    before = setup.mse()
    config = CorrectionConfig(steps=80, lr_codes=3e-3, batch=2, heldout=0, latent_init=0.05)
    result = correct_block(setup.block, setup.inputs, setup.targets, lambda b, h: b(h), config)
    assert result.mse_before == _approx(before)
    assert result.mse_after == _approx(setup.mse())  # the block handed back has this error
    assert result.mse_after < result.mse_before
    assert 0 < result.flipped < 1
    assert result.flipped == setup.flipped()  # the fraction of code bits that changed
    setup.assert_frozen_head()  # only the correctable parameters were trained


def test_a_correction_that_hurts_is_rolled_back_exactly():
    setup = _Setup()
    before = setup.mse()
    passes: list[torch.Tensor] = []

    def run_block(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = block(h)
        if torch.is_grad_enabled():
            return -out  # trains the block towards -targets: the true error grows
        passes.append(out)  # the full-error passes run without grad, in input order
        return out

    config = CorrectionConfig(steps=30, lr_codes=0.05, batch=2, heldout=0)
    result = correct_block(setup.block, setup.inputs, setup.targets, run_block, config)
    assert len(passes) == 6  # two full passes of batches 2 + 2 + 1
    trained = float((torch.cat(passes[3:]) - setup.targets).pow(2).mean())
    assert trained > 2 * before  # the rollback really was needed
    assert result.mse_before == result.mse_after == _approx(before)
    assert result.flipped == 0.0 == setup.flipped()
    for name, value in setup.block.named_parameters():
        assert torch.equal(value.detach(), setup.params[name]), name
    assert setup.mse() == _approx(before)
    setup.assert_frozen_head()


def _approx(value: float):
    return pytest.approx(value, rel=1e-6)


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
        modules.append(CorrectableLinear(q, None, 1.0, q.margin))  # the job's start
    block = torch.nn.Sequential(modules[0], torch.nn.ReLU(), modules[1])
    result = correct_block(
        block, x, target, lambda m, h: m(h), CorrectionConfig(steps=150, batch=4)
    )
    assert result.mse_after < 0.8 * result.mse_before
    assert result.heldout_after < result.heldout_before  # judged on windows it never saw
    assert 0 < result.flipped < 0.5
    exported = modules[0].export()
    with torch.no_grad():
        assert torch.allclose(exported.dequantize(), modules[0].weight(), atol=1e-5)


def test_recomputing_the_weight_in_backward_gives_the_same_gradients(monkeypatch):
    """The GPU path (checkpointed reconstruction) against the CPU path, on the CPU: same
    loss, same gradients bit for bit (so CPU and GPU runs differ only by their arithmetic)."""
    import liftq_cli.quant.block_correction as module

    calls = []
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(6, 20)
    grads = {}
    plain_is_cuda = torch.nn.Parameter.is_cuda
    for recompute in (False, True):
        layer = CorrectableLinear(_random_quantized(12, 20, seed=3), None, 0.05)
        if recompute:  # what `weight` does on a CUDA latent
            monkeypatch.setattr(type(layer.latent), "is_cuda", property(lambda _t: True))
        loss = layer(x).pow(2).sum()
        loss.backward()
        assert len(calls) == recompute
        monkeypatch.setattr(type(layer.latent), "is_cuda", plain_is_cuda)
        grads[recompute] = [loss.detach()] + [getattr(layer, n).grad for n in TRAINED]
    for plain, again in zip(grads[False], grads[True], strict=True):
        assert torch.equal(plain, again)


def test_heldout_windows_are_never_trained_on_and_pick_the_kept_step():
    """The last `heldout` windows are only ever run without gradients; they are measured every
    `eval_every` steps, `patience` measurements without a gain stop training, and the kept
    step is the measurement with the lowest held-out error."""
    setup = _Setup()  # 5 windows: heldout 4 is capped at half, 2
    trained_rows: list[torch.Tensor] = []
    judged: list[float] = []
    held = setup.inputs[3:]

    def run_block(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        out = block(h)
        if torch.is_grad_enabled():
            trained_rows.append(h)
        elif h.shape == held.shape and torch.equal(h, held):
            judged.append(float((out - setup.targets[3:]).pow(2).mean()))
        return out

    config = CorrectionConfig(steps=400, lr_codes=3e-3, batch=2, eval_every=5, patience=2)
    result = correct_block(setup.block, setup.inputs, setup.targets, run_block, config)
    seen = torch.cat(trained_rows).flatten(1)
    assert not any((seen == w.flatten()).all(1).any() for w in held)
    assert len(trained_rows) < 400  # stopped early
    measured = judged[1:]  # judged[0]: the start
    assert result.heldout_before == _approx(judged[0])
    best = min(range(len(measured)), key=measured.__getitem__)
    if measured[best] < judged[0]:
        assert result.steps == 5 * (best + 1)
        assert result.heldout_after == _approx(measured[best])
        assert len(measured) - 1 - best == config.patience  # stopped `patience` after it
    else:
        assert result.steps == 0 and result.heldout_after == _approx(judged[0])
    assert result.mse_after <= result.mse_before


def _relative(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).sum(-1) / target.pow(2).sum(-1)


def test_token_loss_weighs_every_token_alike_and_reports_that_error():
    # Token 0 of every window is an attention-sink-like outlier, 300x the others (SmolLM2's
    # position-0 states carry 97% of block 15's squared output): the squared error is all
    # about it, the per-token relative error is not.
    runs = {}
    for loss in ("mse", "token"):
        setup = _Setup()
        inputs = setup.inputs.clone()
        inputs[:, 0] *= 300
        targets = setup.targets_for(inputs)
        start = _relative(setup.block(inputs).detach(), targets)
        config = CorrectionConfig(steps=120, lr_codes=3e-3, batch=2, heldout=0, loss=loss)
        result = correct_block(setup.block, inputs, targets, lambda b, h: b(h), config)
        with torch.no_grad():
            end = _relative(setup.block(inputs), targets)
        if loss == "token":  # the reported error is the mean per-token relative error
            assert result.mse_before == _approx(float(start.mean()))
            assert result.mse_after == _approx(float(end.mean()))
        runs[loss] = float(end[:, 1:].mean())
    assert runs["token"] < 0.8 * runs["mse"]  # the ordinary tokens gain from it


def test_an_unknown_correction_loss_is_refused():
    with pytest.raises(BadInputError, match="'l1' is unknown: use mse or token"):
        CorrectionConfig(loss="l1")
