"""`liftq pack` end to end: JSON bytes per part, `liftq eval` on the packed folder, bad input."""

from __future__ import annotations

import json
import shutil

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
    fp16 = ("--embed", "fp16", "--lm-head", "fp16")  # the same logits as the unpacked model
    result = cli("pack", str(quant), "--out", str(out), *fp16, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert set(payload["bytes"]) == {
        "codes",
        "scales",
        "whitening",
        "lattice_matrices",
        "embed",
        "lm_head",
        "unquantized",
        "header",
    }
    assert payload["bytes"]["embed"] == payload["formula_bytes"]["embed"] == 2 * 64 * 48
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
    assert "embeddings host, lm_head int8 (from the plan's defaults)" in result.stdout


def test_pack_defaults_are_the_plans_or_the_quantize_recipes(cli, quant, tmp_path):
    """No flags: the recipe the quantize run recorded decides (it came from `liftq plan`);
    without one, the plan's defaults (host, int8). A flag overrides either."""
    result = cli("pack", str(quant), "--out", str(tmp_path / "a"), "--json")
    payload = json.loads(result.stdout)
    assert (payload["embeddings"]["embed"], payload["embeddings"]["lm_head"]) == ("host", "int8")
    assert payload["embeddings_from"] == "the plan's defaults"
    planned = tmp_path / "planned"
    shutil.copytree(quant, planned)
    recipe = "format_version: 2\nmodel: tiny\nconfig: LQ-24/10\nctx: 64\n"
    (planned / "recipe.yaml").write_text(recipe + "embed: int4\nlm_head: fp16\n")
    payload = json.loads(cli("pack", str(planned), "--out", str(tmp_path / "b"), "--json").stdout)
    assert (payload["embeddings"]["embed"], payload["embeddings"]["lm_head"]) == ("int4", "fp16")
    assert "recipe.yaml" in payload["embeddings_from"]
    args = ("--out", str(tmp_path / "c"), "--lm-head", "INT8", "--json")
    payload = json.loads(cli("pack", str(planned), *args).stdout)
    assert (payload["embeddings"]["embed"], payload["embeddings"]["lm_head"]) == ("int4", "int8")


def test_pack_bad_input_is_one_line(cli, quant, tmp_path):
    missing = tmp_path / "nope"
    result = cli("pack", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "nope", "liftq quantize")
    result = cli("pack", str(quant), "--out", str(quant / "inner"))
    assert_one_line_error(result, "is inside the input")
    result = cli("pack", str(quant), "--out", str(tmp_path / "o"), "--dtype", "int4", "--json")
    assert_one_line_error(result, "--dtype 'int4'")
    assert json.loads(result.stdout)["exit_code"] == 2
    result = cli("pack", str(quant), "--out", str(tmp_path / "o"), "--embed", "fp8", "--json")
    assert_one_line_error(result, "--embed 'fp8' is unknown", "fp16, int8, int4, host")
    assert json.loads(result.stdout)["exit_code"] == 2
    result = cli("pack", str(quant), "--out", str(tmp_path / "o"), "--lm-head", "host")
    assert_one_line_error(result, "--lm-head 'host' is unknown", "fp16, int8, int4")
    broken = tmp_path / "broken"
    shutil.copytree(quant, broken)
    (broken / "recipe.yaml").write_text("format_version: 2\nmodel: t\nconfig: LQ-24/10\nembed: x\n")
    result = cli("pack", str(broken), "--out", str(tmp_path / "o"))
    assert_one_line_error(result, "embed 'x' is unknown")
    assert not (tmp_path / "o").exists()


def test_eval_refuses_a_packed_folder_of_another_format_version(cli, quant, tmp_path):
    out = tmp_path / "packed"
    assert cli("pack", str(quant), "--out", str(out)).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    result = cli("eval", str(out), "--ppl", str(write_text(tmp_path / "w.txt")), "--ctx", "32")
    assert_one_line_error(result, "format version 99", "re-pack")
