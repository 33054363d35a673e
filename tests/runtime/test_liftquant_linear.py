"""`LiftQuantLinear` computes what the quantizer's own dequantized weight computes."""

from __future__ import annotations

import os

import pytest
import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix

from liftq_cli.io.packed import pack_linear
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.whitening import init_whitening
from liftq_cli.runtime.linear import LatticeBank, LiftQuantLinear, replace_linears
from liftq_kernels.reference import plain_words

CFG = LatticeConfig(8, 4)
FP16_FACTORS = 2e-3  # scales, whitening factors and M are stored in fp16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def packed_layer(out_features: int, in_features: int, bias: bool = False):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    act = torch.rand(in_features, generator=g) + 0.5
    wh = init_whitening(in_features, act, alpha=0.5, seed=0)
    q = quantize_linear(weight, wh, CFG, tiny_matrix(8, 4), brute_force_encode)
    bank = LatticeBank([CFG])
    bank.D8_d4.copy_(q.matrix.half())
    layer = LiftQuantLinear(in_features, out_features, CFG, bank, bias=bias)
    for name, tensor in pack_linear({f"w.{k}": v for k, v in q.state().items()}, "w.", CFG).items():
        getattr(layer, name).copy_(tensor)
    if bias:
        layer.bias.data = torch.randn(out_features, generator=g)
    return q, layer


@pytest.mark.parametrize(("out_features", "in_features"), [(24, 30), (7, 48)])
def test_forward_matches_the_dequantized_weight(out_features, in_features):
    q, layer = packed_layer(out_features, in_features)
    assert rel(layer.dequantize(), q.dequantize()) < FP16_FACTORS
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (2, 5, out_features) and y.dtype == torch.float32
    assert rel(y, x @ q.dequantize().T) < FP16_FACTORS


def test_bias_and_low_precision_inputs():
    q, layer = packed_layer(12, 30, bias=True)
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(2))
    ref = x @ q.dequantize().T + layer.bias
    assert rel(layer(x), ref) < FP16_FACTORS
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel(y.float(), ref) < 1e-2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs the interpreter")
def test_triton_backend_agrees_with_torch_on_cpu(monkeypatch):
    _, layer = packed_layer(24, 30)
    x = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    slow = layer(x)
    monkeypatch.setenv("LIFTQ_BACKEND", "triton")
    fast = layer(x)
    assert rel(fast, slow) < 2e-3  # the kernels' activation is fp16 (bitgemv.py)


@pytest.mark.parametrize("in_features", [30, 32])  # dense factors; Hadamard factors as signs
def test_a_format_1_layer_computes_what_format_2_computes(in_features):
    """Format-1 files still load: plain-bitstream codes and dense factors, moved on first use."""
    q, layer = packed_layer(9, in_features)
    old = LiftQuantLinear(in_features, 9, CFG, layer.bank, version=1)
    words = plain_words(layer.qweight)[:, : old.qweight.shape[1]]
    old.qweight.copy_(words)
    for name in ("qscale", "s1", "s2"):
        getattr(old, name).copy_(getattr(layer, name))
    state = q.state()
    old.p1.copy_(state["p1"].half())
    old.p2.copy_(state["p2"].half())
    x = torch.randn(4, in_features, generator=torch.Generator().manual_seed(4))
    assert torch.equal(old.kernel_words(), layer.kernel_words())
    assert rel(old(x), layer(x)) < FP16_FACTORS
    assert rel(old.dequantize(), q.dequantize()) < FP16_FACTORS


def test_replace_linears_swaps_named_layers_and_shares_the_bank():
    model = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.Linear(8, 4, bias=False))
    bank = replace_linears(model, {"0": CFG, "1": LatticeConfig(9, 4)})
    assert isinstance(model[0], LiftQuantLinear) and model[0].bias is not None
    assert model[1].bank is model[0].bank is bank is model.liftq_lattice
    assert sorted(dict(model.named_buffers())) == sorted(
        [f"0.{n}" for n in ("qweight", "qscale", "s1", "p1", "p2", "s2")]  # 30 = 5 x 6
        + [f"1.{n}" for n in ("qweight", "qscale", "s1", "p1_signs", "p2_signs", "s2")]  # 2 x 4
        + ["liftq_lattice.D8_d4", "liftq_lattice.D9_d4"]
    )
    with pytest.raises(KeyError, match="not an nn.Linear"):
        replace_linears(torch.nn.Sequential(torch.nn.ReLU()), {"0": CFG})
