"""io/quantized.py: the quantize output is compact (codes at one bit per code bit, no dense
copy of a quantized weight), reads back exactly, and refuses corrupt or foreign folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.runtime.tiny_packed import ATTN, MLP, quant_dir

from liftq_cli.errors import BadInputError
from liftq_cli.io.quantized import (
    CODES_FILE,
    META_FILE,
    UNQUANTIZED_FILE,
    is_quantized_folder,
    read_quantized,
)


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    return quant_dir(tmp_path_factory.getbasetemp() / "tiny")


def test_the_folder_holds_codes_not_dense_weights(quant):
    folder = read_quantized(quant)
    assert folder.format_version == 2 and len(folder.layers) == 14
    assert folder.layers["model.layers.0.mlp.down_proj"] == MLP
    assert folder.layers["model.layers.0.self_attn.q_proj"] == ATTN
    assert not (quant / "model.safetensors").exists()  # transformers cannot mistake it
    unquantized = load_file(quant / UNQUANTIZED_FILE)
    assert not any(f"{name}.weight" in unquantized for name in folder.layers)
    assert "model.embed_tokens.weight" in unquantized and "lm_head.weight" in unquantized
    code_bits = 0
    with safe_open(quant / CODES_FILE, framework="pt") as handle:
        for name, cfg in folder.layers.items():
            out, inp = folder.shapes[name]
            row_bits = -(-inp // cfg.d) * cfg.D
            codes = handle.get_slice(f"{name}.codes")
            assert codes.get_dtype() == "I32" and codes.get_shape() == [out, -(-row_bits // 32)]
            code_bits += out * row_bits
        stored = sum(handle.get_slice(f"{n}.codes").get_shape()[0] for n in folder.layers)
    assert stored > 0
    # bytes of all codes: the code bits rounded up to whole 32-bit words per row
    words = sum(
        folder.shapes[n][0] * -(-(-(-folder.shapes[n][1] // c.d) * c.D) // 32)
        for n, c in folder.layers.items()
    )
    assert words * 32 - code_bits < 32 * sum(folder.shapes[n][0] for n in folder.layers)


def test_linear_states_come_back_as_bool_codes(quant):
    folder = read_quantized(quant)
    state = folder.linear_state("model.layers.1.mlp.up_proj")
    out, inp = folder.shapes["model.layers.1.mlp.up_proj"]
    assert state["codes"].dtype == torch.bool and state["codes"].shape == (out, -(-inp // 4), 9)
    assert state["scale"].dtype == torch.float32 and state["s1"].shape == (inp,)
    assert set(folder.matrices()) == {"LQ-8/5", "LQ-9/4"}
    assert is_quantized_folder(quant) and not is_quantized_folder(quant.parent / "fp")


def copy(quant, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(quant, broken)
    return broken


def test_a_truncated_codes_file_is_refused(quant, tmp_path):
    broken = copy(quant, tmp_path)
    data = (broken / CODES_FILE).read_bytes()
    (broken / CODES_FILE).write_bytes(data[: len(data) - 100])
    with pytest.raises(BadInputError, match="liftq_codes.safetensors' is corrupt"):
        read_quantized(broken)


def test_another_format_version_and_a_missing_part_are_refused(quant, tmp_path):
    broken = copy(quant, tmp_path)
    meta = json.loads((broken / META_FILE).read_text())
    (broken / META_FILE).write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(BadInputError, match="format_version 7"):
        read_quantized(broken)
    (broken / META_FILE).write_text(json.dumps(meta))
    codes = load_file(broken / CODES_FILE)
    del codes["model.layers.1.mlp.up_proj.s2"]
    save_file(codes, str(broken / CODES_FILE))
    with pytest.raises(BadInputError, match="lacks model.layers.1.mlp.up_proj.s2"):
        read_quantized(broken)
    (broken / META_FILE).write_text("{")
    with pytest.raises(BadInputError, match="is not a liftq quantize manifest"):
        read_quantized(broken)


def test_a_format_1_folder_still_reads(quant, tmp_path):
    """liftq 0.1 wrote bool codes and a fake-quant model.safetensors of every tensor."""
    folder = read_quantized(quant)
    old = tmp_path / "v1"
    shutil.copytree(quant, old)
    codes = load_file(old / CODES_FILE)
    for name, state in folder.linear_states().items():
        codes[f"{name}.codes"] = state["codes"]
    save_file(codes, str(old / CODES_FILE))
    dense = load_file(old / UNQUANTIZED_FILE)
    dense.update({f"{n}.weight": torch.zeros(folder.shapes[n]) for n in folder.layers})
    save_file(dense, str(old / "model.safetensors"))
    (old / UNQUANTIZED_FILE).unlink()
    meta = json.loads((old / META_FILE).read_text())
    (old / META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    v1 = read_quantized(old)
    assert v1.format_version == 1
    for name in folder.layers:
        a, b = v1.linear_state(name), folder.linear_state(name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(v1.unquantized()) == sorted(folder.unquantized())
