"""runtime/quantized.py: a quantize output reloads as the dense model the quantizer measured."""

from __future__ import annotations

import pytest
import torch
from tests.runtime.tiny_packed import quant_dir

from liftq_cli.errors import BadInputError
from liftq_cli.io.quantized import read_quantized
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.runtime.quantized import dequantized_state, load_quantized_model


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    return quant_dir(tmp_path_factory.getbasetemp() / "tiny")


def test_every_quantized_weight_is_its_reconstruction(quant):
    folder = read_quantized(quant)
    model = load_quantized_model(quant)
    matrices = folder.matrices()
    params = dict(model.named_parameters())
    for name, cfg in folder.layers.items():
        linear = QuantizedLinear.from_state(folder.linear_state(name), cfg, matrices[cfg.name])
        assert torch.equal(params[f"{name}.weight"].detach(), linear.dequantize()), name
    for name, tensor in folder.unquantized().items():
        assert torch.equal(params[name].detach(), tensor.float()), name
    assert not model.training


def test_a_missing_tensor_is_refused_naming_it(quant, tmp_path, monkeypatch):
    import liftq_cli.runtime.quantized as module

    state = dequantized_state(quant)
    state.pop("model.norm.weight")
    monkeypatch.setattr(module, "dequantized_state", lambda folder: state)
    with pytest.raises(BadInputError, match="lacks 'model.norm.weight'"):
        load_quantized_model(quant)
