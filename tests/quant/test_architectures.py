"""Decoders liftq does not know by name: the block stage calls each block as the model does,
and quantize -> pack -> load in transformers works for every architecture in
tests/quant/tiny_decoders.py; the ones that cannot work yet are refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tests.quant.test_encode import brute_force_encode, tiny_matrix
from tests.quant.tiny_decoders import REFUSED, SUPPORTED, save_tiny
from tests.runtime.tiny_packed import one_thread

from liftq_cli.errors import BadInputError
from liftq_cli.io.packed import pack_quantized
from liftq_cli.io.quantized import CODES_FILE, META_FILE, write_quantized
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant import blocks, decoder, exchange
from liftq_cli.quantize_job import CorrectionConfig, QuantizeSettings
from liftq_cli.runtime.quantized import load_quantized_model

CFG = LatticeConfig(8, 4)
MATRIX = tiny_matrix(8, 4)
SETTINGS = QuantizeSettings(whiten_steps=2, correction=CorrectionConfig(steps=2, batch=2))
SEQ = 24  # longer than the sliding window (8), so local and global layers differ


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _reference(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_blocks_called_as_the_model_calls_them_give_its_logits(tmp_path, model_type):
    folder = save_tiny(tmp_path / model_type, model_type)
    reference = _reference(folder)
    ids = _ids(3, 1)  # 3 windows in batches of 2: the recorded arguments broadcast
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    config, skeleton = blocks.build_skeleton(folder)
    reader = decoder.checkpoint_reader(folder)
    layers = decoder.find_layers(skeleton, config.num_hidden_layers)
    base = decoder.load_backbone(skeleton, reader, torch.device("cpu"))
    calls = decoder.layer_calls(base, layers, SEQ)
    hidden = decoder.embed(base, layers, ids, 2)
    for index, block in enumerate(layers):
        blocks.load_block(block, reader, f"model.layers.{index}.")
        with torch.no_grad():
            hidden = blocks.block_runner(calls[index], 2)(block.eval(), hidden)
    with torch.no_grad():
        logits = reference.lm_head(reference.model.norm(hidden))
        if getattr(config, "final_logit_softcapping", None):
            cap = config.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def quantize_tiny(folder, work, quant, settings: QuantizeSettings = SETTINGS) -> list:
    """The 2-block tiny model in `folder` quantized at LQ-8/4 into `quant` (work dir
    `work`); returns the block reports."""
    with one_thread():
        reports = blocks.quantize_blocks(
            folder,
            lambda *_: CFG,
            _ids(4, 0),
            WorkDir(work),
            lambda _c: MATRIX,
            brute_force_encode,
            settings,
            {"job": str(folder)},
        )
        reader = decoder.checkpoint_reader(folder)  # experts unfused
        write_quantized(folder, WorkDir(work), quant, 2, lambda _c: MATRIX, {}, "", None, reader)
    return reports


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_quantize_pack_and_load_in_transformers(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    import liftq_cli  # noqa: F401  (registers the packed format with transformers)

    folder = save_tiny(tmp_path / model_type, model_type)
    work, quant, packed = tmp_path / "work", tmp_path / "quant", tmp_path / "packed"
    reports = quantize_tiny(folder, work, quant)
    assert [r.layer for r in reports] == [0, 1]
    skeleton = blocks.build_skeleton(folder)[1]
    every = {
        f"model.layers.{i}.{name}"
        for i, block in enumerate(skeleton.model.layers)
        for name in exchange.linear_kinds(block)
    }
    layers = json.loads((quant / META_FILE).read_text())["layers"]
    assert set(layers) == every  # every linear in a block is quantized, none outside
    with safe_open(quant / "liftq_unquantized.safetensors", framework="pt") as handle:
        assert not {f"{name}.weight" for name in every} & set(handle.keys())
    with safe_open(quant / CODES_FILE, framework="pt") as handle:
        assert {f"{name}.codes" for name in every} <= set(handle.keys())
    pack_quantized(quant, packed, embed="fp16", lm_head="fp16", dtype="float32")
    ids = _ids(2, 5)
    fake = load_quantized_model(quant)
    served = AutoModelForCausalLM.from_pretrained(packed).eval()
    with torch.no_grad():
        expected, got = fake(ids).logits, served(ids).logits
        full = _reference(folder)(ids).logits
    # the packed file keeps scales and whitening in fp16: agreement to fp16 precision
    assert float((got - expected).norm() / expected.norm()) < 5e-3
    assert float((full - expected).norm() / full.norm()) > 1e-2  # really quantized


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_architectures_that_cannot_work_yet_are_refused_by_name(tmp_path, model_type):
    fields, reason = REFUSED[model_type]
    folder = save_tiny(tmp_path / model_type, model_type, fields)
    with pytest.raises(BadInputError, match=reason) as refused:
        blocks.build_skeleton(folder)
    assert model_type in str(refused.value) and "\n" not in str(refused.value)


def test_a_config_transformers_does_not_know_is_refused_in_one_line(tmp_path):
    save_tiny(tmp_path / "m", "llama")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    with pytest.raises(BadInputError, match="transformers cannot read the config"):
        blocks.build_skeleton(tmp_path / "m")
