"""quant/reconstruct.py: the one signs -> weight formula, and every caller agrees with it."""

from __future__ import annotations

import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix

from liftq_cli.io.packed import pack_linear
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.block_correction import CorrectableLinear
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.finetune import TunedLinear
from liftq_cli.quant.reconstruct import QuantizedLinear, reconstruct
from liftq_cli.quant.whitening import init_whitening, unwhiten_weight
from liftq_cli.runtime.linear import LatticeBank, LiftQuantLinear

CFG = LatticeConfig(8, 4)


def quantized(out: int = 12, inp: int = 30) -> QuantizedLinear:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inp, generator=g)
    wh = init_whitening(inp, torch.rand(inp, generator=g) + 0.5, alpha=0.5, seed=1)
    return quantize_linear(weight, wh, CFG, tiny_matrix(8, 4), brute_force_encode)


def test_reconstruct_is_the_documented_formula():
    q = quantized()
    signs = q.signs()  # [out, slices, D]
    explicit = torch.cat([signs[:, s] @ q.matrix.T for s in range(signs.shape[1])], dim=1)
    explicit = explicit[:, : q.in_features] * q.scale[:, None]  # diag(s) Q blockdiag(M^T), cut
    expected = unwhiten_weight(explicit, q.whitening)
    torch.testing.assert_close(reconstruct(signs, q.matrix, q.scale, q.whitening), expected)
    assert q.dequantize().shape == (12, 30)


def test_every_caller_computes_the_same_weight():
    q = quantized()
    weight = q.dequantize()
    corrected = CorrectableLinear(q, None, latent_init=0.05)  # STE signs of the latent
    assert torch.equal(corrected.weight().detach(), weight)
    assert torch.equal(corrected.export().dequantize(), weight)
    tuned = TunedLinear(q, None)  # fine-tuning starts at zero log-multipliers
    assert torch.equal(tuned.weight().detach(), weight)
    bank = LatticeBank([CFG])
    bank.D8_d4.copy_(q.matrix)
    packed = LiftQuantLinear(30, 12, CFG, bank)
    state = {f"w.{k}": v for k, v in q.state().items()}
    for name, tensor in pack_linear(state, "w.", CFG).items():
        getattr(packed, name).copy_(tensor)
    # the packed runtime stores fp16 scales and whitening factors: equal to fp16 rounding
    assert float((packed.dequantize() - weight).norm() / weight.norm()) < 2e-3


def test_state_round_trips():
    q = quantized()
    back = QuantizedLinear.from_state(q.state(), CFG, q.matrix)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    assert set(q.state()) == {"codes", "scale", "s1", "p1", "p2", "s2"}
