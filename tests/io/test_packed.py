"""`pack_quantized`: exact codes, byte accounting against the closed formula, bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tests.runtime.tiny_packed import ATTN, MLP, quant_dir

from liftq_cli.errors import BadInputError
from liftq_cli.io.packed import pack_quantized, read_packed_config, unpack_codes
from liftq_cli.io.packed_format import (
    FORMAT_VERSION,
    lattice_key,
    linear_tensors,
)
from liftq_cli.io.quantized import read_quantized
from liftq_cli.plan.architectures import from_hf_config, linears
from liftq_cli.plan.memory import MemorySettings, model_breakdown

REAL_QUANT = Path(os.environ.get("LIFTQ_SMOLLM2_QUANT", "/work/out/smollm2-LQ-24-10"))


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "tiny"
    quant = quant_dir(root)
    # fp16 embedding and lm_head: these tests are about the linears (the other choices:
    # tests/io/test_packed_embeddings.py)
    # its own folder: tests/runtime reuse root / "packed" in whatever order pytest runs them
    out = root / "packed-io"
    report = pack_quantized(quant, out, embed="fp16", lm_head="fp16")
    return quant, out, report


def test_pack_then_unpack_returns_every_code_bit(packed):
    quant, out, _ = packed
    quantized = read_quantized(quant)
    unpacked = unpack_codes(out)
    assert len(unpacked) == 14
    for key, bits in unpacked.items():
        assert torch.equal(bits, quantized.linear_state(key)["codes"]), key


def test_file_holds_the_format_tensors(packed):
    quant, out, _ = packed
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "liftquant" and config["format_version"] == FORMAT_VERSION
    layers = read_packed_config(out)
    assert layers["model.layers.1.self_attn.q_proj"] == ATTN
    assert layers["model.layers.1.mlp.down_proj"] == MLP
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
        assert handle.metadata()["liftq_format"] == str(FORMAT_VERSION)
        spec = linear_tensors(96, 48, MLP)  # gate_proj: 12 slices x 9 bits = 108 bits
        for name, tensor_spec in spec.items():
            t = handle.get_tensor(f"model.layers.0.mlp.gate_proj.{name}")
            assert tuple(t.shape) == tensor_spec.shape
            assert str(t.dtype).endswith(tensor_spec.dtype)
        assert tuple(handle.get_tensor(lattice_key(ATTN)).shape) == (5, 8)
        assert handle.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert not any(n.endswith("proj.weight") for n in names)  # no dense copy of a linear
    assert sum(n.startswith("liftq_lattice.") for n in names) == 2  # each used M once


def test_bytes_equal_the_closed_formula_and_the_plan(packed):
    quant, out, report = packed
    parts = report.parts
    assert sum(parts.values()) == (out / "model.safetensors").stat().st_size
    for key, value in report.formula.items():
        assert parts[key] == value, key
    # The plan prices the same architecture and configs with the same formula.
    arch = from_hf_config(json.loads((quant / "config.json").read_text()), "tiny", "tiny")
    breakdown = model_breakdown(
        arch,
        lambda spec: ATTN if spec.kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else MLP,
        MemorySettings(embed="fp16", lm_head="fp16"),
    )
    assert breakdown.weights == sum(report.formula.values())
    tensors = sum(v for k, v in parts.items() if k != "header")
    planned = breakdown.weights + sum(breakdown.parts[k] for k in ("embed", "lm_head"))
    assert planned + breakdown.parts["norms_biases"] == tensors
    assert len(linears(arch)) == 14


def test_effective_bits_are_nominal_plus_reported_overhead(packed):
    _, _, report = packed
    bits = report.bits
    quantized = sum(report.parts[k] for k in report.formula)
    assert abs(bits.effective_bits * bits.weights / 8 - quantized) < 1e-6
    attn, mlp = 2 * (48 * 48 * 2 + 24 * 48 * 2), 2 * (96 * 48 * 3)
    assert bits.weights == attn + mlp
    nominal = (attn * ATTN.bits + mlp * MLP.bits) / (attn + mlp)
    assert bits.nominal_bits == pytest.approx(nominal)
    # d = 5 does not divide 48: the attention rows carry padding bits
    assert bits.overhead_bits["padding"] > 0


def test_refuses_incomplete_or_misplaced_input(packed, tmp_path):
    quant, _, _ = packed
    with pytest.raises(BadInputError, match="has no liftq.json"):
        pack_quantized(quant.parent / "fp", tmp_path / "x")
    with pytest.raises(BadInputError, match="is inside the input"):
        pack_quantized(quant, quant / "packed")
    with pytest.raises(BadInputError, match="--dtype 'int8'"):
        pack_quantized(quant, tmp_path / "y", dtype="int8")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_refuses_a_corrupt_codes_file(packed, tmp_path):
    import shutil

    quant, _, _ = packed
    broken = tmp_path / "broken"
    shutil.copytree(quant, broken)
    (broken / "liftq_codes.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadInputError, match="liftq_codes.safetensors' is corrupt"):
        pack_quantized(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_value_that_overflows_fp16_fails_mid_stream_and_leaves_nothing(packed, tmp_path):
    import shutil

    from safetensors.torch import save_file

    quant, _, _ = packed
    broken = tmp_path / "broken"
    shutil.copytree(quant, broken)
    codes = load_file(broken / "liftq_codes.safetensors")
    codes["model.layers.1.mlp.up_proj.scale"] *= 1e9  # beyond fp16's 65504
    save_file(codes, str(broken / "liftq_codes.safetensors"))
    with pytest.raises(BadInputError, match="up_proj.scale does not fit float16"):
        pack_quantized(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no temporary folder left


def test_reader_refuses_another_format_version(packed, tmp_path):
    _, out, _ = packed
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadInputError, match=f"version {FORMAT_VERSION + 1} is not supported"):
        read_packed_config(tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_QUANT / "liftq_codes.safetensors").is_file(), reason="no smollm2")
def test_smollm2_packed_bytes_match_the_plan(tmp_path):
    """The plan's bytes for smollm2-135m equal the packed file's within 0.5% (same formula)."""
    from liftq_cli.plan.architectures import resolve_architecture

    report = pack_quantized(REAL_QUANT, tmp_path / "packed", embed="fp16", lm_head="fp16")
    layers = read_packed_config(tmp_path / "packed")
    arch = resolve_architecture("smollm2-135m")
    breakdown = model_breakdown(
        arch,
        lambda spec: layers[_hf_name(spec.name)],
        MemorySettings(embed="fp16", lm_head="fp16"),
    )
    quantized = sum(report.parts[k] for k in report.formula)
    assert abs(breakdown.weights / quantized - 1) < 0.005
    planned = breakdown.weights + sum(
        breakdown.parts[k] for k in ("embed", "lm_head", "norms_biases")
    )
    file_bytes = (tmp_path / "packed" / "model.safetensors").stat().st_size
    assert abs(planned / file_bytes - 1) < 0.005
    bits = report.bits
    assert abs(bits.effective_bits * bits.weights / 8 - quantized) < 1e-3


def _hf_name(name: str) -> str:
    """layers.3.q_proj -> model.layers.3.self_attn.q_proj (the plan's names -> HF module names)."""
    _, layer, kind = name.split(".")
    block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{kind}"
