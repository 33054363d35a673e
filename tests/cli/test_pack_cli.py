"""`liftq pack` end to end: JSON bytes per part, `liftq eval` on the packed folder, bad input."""

from __future__ import annotations

import json

import pytest
from tests.helpers import assert_one_line_error
from tests.runtime.tiny_packed import one_thread, quant_dir, write_text


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def quant(tmp_path_factory):
    return quant_dir(tmp_path_factory.getbasetemp() / "tiny")


def test_pack_json_then_eval_the_packed_folder(cli, quant, tmp_path):
    out = tmp_path / "packed"
    result = cli("pack", str(quant), "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["bytes"]) == {
        "codes",
        "scales",
        "whitening",
        "lattice_matrices",
        "unquantized",
        "header",
    }
    assert payload["quantized_bytes"] == payload["formula_quantized_bytes"]
    assert payload["files"]["model.safetensors"] == sum(payload["bytes"].values())
    assert payload["linears"] == 14 and payload["configs"] == {"LQ-8/5": 8, "LQ-9/4": 6}
    assert not list(tmp_path.glob(".packed*"))  # no temporary folder left behind

    text = write_text(tmp_path / "words.txt")
    args = ("--ppl", str(text), "--ctx", "32", "--json")
    packed = json.loads(cli("eval", str(out), *args).stdout)["results"]
    unpacked = json.loads(cli("eval", str(quant), *args).stdout)["results"]
    ppl_packed = next(iter(packed.values()))["ppl"]
    ppl_unpacked = next(iter(unpacked.values()))["ppl"]
    assert abs(ppl_packed / ppl_unpacked - 1) < 1e-3


def test_pack_table_output(cli, quant, tmp_path):
    result = cli("pack", str(quant), "--out", str(tmp_path / "p"))
    assert result.exit_code == 0
    assert "bits per weight" in result.stdout and "lattice_matrices" in result.stdout


def test_pack_bad_input_is_one_line(cli, quant, tmp_path):
    missing = tmp_path / "nope"
    result = cli("pack", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "nope", "liftq quantize")
    result = cli("pack", str(quant), "--out", str(quant / "inner"))
    assert_one_line_error(result, "is inside the input")
    result = cli("pack", str(quant), "--out", str(tmp_path / "o"), "--dtype", "int4", "--json")
    assert_one_line_error(result, "--dtype 'int4'")
    assert json.loads(result.stdout)["exit_code"] == 2
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_packed_folder_of_another_format_version(cli, quant, tmp_path):
    out = tmp_path / "packed"
    assert cli("pack", str(quant), "--out", str(out)).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    result = cli("eval", str(out), "--ppl", str(write_text(tmp_path / "w.txt")), "--ctx", "32")
    assert_one_line_error(result, "format version 99", "re-pack")
