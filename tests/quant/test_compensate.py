"""Error-compensating targets (quant/compensate.py) and the statistics they are solved from
(quant/stats.py with a full-precision reference), checked against closed forms."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from liftq_cli.quant.block_encode import swapped
from liftq_cli.quant.compensate import compensated_weight
from liftq_cli.quant.stats import Reference, collect, finish


def _inputs(n: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_f (correlated Gaussian), x_q = A x_f + noise (a systematic input error plus a
    little that no linear map predicts), and A."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x_f = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ (torch.eye(n) + mix)
    a = torch.eye(n, dtype=torch.float64) + 0.2 * torch.randn(n, n, generator=g) / n**0.5
    x_q = x_f @ a.T + 0.02 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return x_f, x_q, a


def _stats(weight: torch.Tensor, x_f: torch.Tensor, x_q: torch.Tensor):
    tokens = x_q.shape[0]
    return x_q.T @ x_q / tokens, (x_f @ weight.T).T @ x_q / tokens


def test_identical_inputs_give_the_weight_back():
    x_f, _, _ = _inputs(24, 400, 0)
    weight = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram, cross = _stats(weight, x_f, x_f)
    for damp in (1e-3, 0.1, 10.0):
        got = compensated_weight(weight, gram, cross, damp)
        torch.testing.assert_close(got, weight, rtol=1e-9, atol=1e-9)


def test_the_target_solves_the_ridge_normal_equations():
    x_f, x_q, _ = _inputs(20, 300, 2)
    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram, cross = _stats(weight, x_f, x_q)
    damp = 0.1
    lam = damp * float(gram.diagonal().mean())
    got = compensated_weight(weight, gram, cross, damp)
    residual = got @ (gram + lam * torch.eye(20, dtype=torch.float64)) - (cross + lam * weight)
    assert float(residual.abs().max()) < 1e-10 * float(cross.abs().max())


def test_held_out_output_error_falls_and_a_large_ridge_gives_the_weight():
    n = 32
    weight = torch.randn(24, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_f, x_q, a = _inputs(n, 2000, 5)
    gram, cross = _stats(weight, x_f, x_q)
    fresh = torch.Generator().manual_seed(6)  # other tokens through the same input error A
    held_f = torch.randn(2000, n, generator=fresh, dtype=torch.float64)
    held_q = held_f @ a.T

    def error(w: torch.Tensor) -> float:
        return float((held_q @ w.T - held_f @ weight.T).pow(2).mean())

    plain, compensated = error(weight), error(compensated_weight(weight, gram, cross, 1e-3))
    assert compensated < 0.05 * plain  # the linear part of the input error is undone
    far = compensated_weight(weight, gram, cross, 1e9)
    torch.testing.assert_close(far, weight, rtol=1e-6, atol=1e-6)
    assert error(compensated_weight(weight, gram, cross, 1.0)) < plain  # a ridge in between


class _Toy(nn.Module):
    """Two linears reading one input, then one reading their product (q/k then o, in small)."""

    def __init__(self, n: int = 6):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(n, n), nn.Linear(n, n, bias=False), nn.Linear(n, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.a(x) * self.b(x))


def _run(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return block(hidden)


def test_cross_sums_pair_each_linear_output_in_the_reference_with_its_input_here():
    torch.manual_seed(0)
    block, fp_block = _Toy(), _Toy()
    fp_block.load_state_dict(block.state_dict())
    with torch.no_grad():
        block.a.weight.add_(0.3)  # "quantized": a earlier stage changed, c reads its output
    fp_in, q_in = torch.randn(4, 5, 6), torch.randn(4, 5, 6)

    reference = Reference(fp_in, lambda: swapped(block, {"a": fp_block.a}), frozenset("bc"))
    linears = {"b": block.b, "c": block.c}
    found = collect(block, linears, _run, q_in, 2, 0, reference)
    assert found.groups == {"b": ["b"], "c": ["c"]}
    with torch.no_grad():
        h_q = block.a(q_in) * block.b(q_in)  # c's input in the block as it is
        h_f = fp_block.a(fp_in) * fp_block.b(fp_in)
        y_f = fp_block.c(h_f) - fp_block.c.bias  # c's output in full precision, no bias
    gram, act, cross = finish(dict(found.sums["c"].stack)[(1, 0)])
    flat_q, flat_y = h_q.reshape(-1, 6).double(), y_f.reshape(-1, 4).double()
    torch.testing.assert_close(gram, (flat_q.T @ flat_q / 20).float())
    torch.testing.assert_close(cross, flat_y.T @ flat_q / 20)
    # the block is itself again after every reference pass
    assert block.a is not fp_block.a and block.a.weight.sum() != fp_block.a.weight.sum()


def test_linears_sharing_an_input_get_one_gram_and_a_cross_sum_each():
    torch.manual_seed(1)
    block = _Toy()
    hidden = torch.randn(2, 3, 6)
    reference = Reference(hidden, contextlib.nullcontext, frozenset({"a", "b"}))
    found = collect(block, {"a": block.a, "b": block.b}, _run, hidden, 2, 0, reference)
    assert found.groups == {"a": ["a", "b"]}
    gram, _, cross_a, cross_b = finish(dict(found.sums["a"].stack)[(0, 0)])
    flat = hidden.reshape(-1, 6).double()
    with torch.no_grad():
        y_a = (block.a(hidden) - block.a.bias).reshape(-1, 6).double()
        y_b = block.b(hidden).reshape(-1, 6).double()
    torch.testing.assert_close(cross_a, y_a.T @ flat / 6)
    torch.testing.assert_close(cross_b, y_b.T @ flat / 6)
    # the reference being this very block, each target is the weight itself
    assert compensated_weight(block.b.weight.detach(), gram, cross_b, 0.1).allclose(
        block.b.weight.detach(), atol=1e-5
    )


def test_a_linear_whose_tokens_differ_between_the_passes_is_refused():
    block = _Toy()
    reference = Reference(torch.randn(2, 4, 6), contextlib.nullcontext, frozenset({"a"}))
    with pytest.raises(AssertionError, match="saw other tokens"):
        collect(block, {"a": block.a}, _run, torch.randn(2, 3, 6), 2, 0, reference)
