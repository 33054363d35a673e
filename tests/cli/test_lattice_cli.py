"""`liftq lattice list|train|bench`: output, JSON and one-line errors."""

from __future__ import annotations

import json

import pytest
from tests.helpers import assert_one_line_error

from liftq_cli.quant.configs import CATALOG_CONFIGS
from liftq_cli.quant.lattice_catalog import load_matrix_file


def test_list_json_has_every_catalog_config(cli):
    result = cli("lattice", "list", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["entries"]
    assert [e["name"] for e in entries] == [c.name for c in CATALOG_CONFIGS]
    for entry in entries:
        assert 0 < entry["gaussian_mse"] < 0.2 and entry["bits"] == pytest.approx(
            entry["D"] / entry["d"], abs=1e-6
        )


def test_list_table(cli):
    result = cli("lattice", "list")
    assert result.exit_code == 0
    assert "LQ-24/10" in result.stdout and "LQ-32/20" in result.stdout


def test_train_writes_a_usable_matrix(cli, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ("lattice", "train", "--D", "8", "--d", "4", "--iterations", "2", "--samples", "512")
    result = cli(*args, "--restarts", "2", "--init", "mixed", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["name"] == "LQ-8/4" and payload["iterations"] == 2
    assert payload["restarts"] == 2 and len(payload["validation"]) == 2
    assert payload["init"] == "mixed" and payload["train_device"] == "cpu"
    assert payload["gaussian_mse"] < 0.25  # 2 bits: scalar INT2 is 0.119, RD bound 0.0625
    assert load_matrix_file(out).shape == (4, 8)


def test_train_takes_the_pooled_and_polish_schedule(cli):
    args = ("lattice", "train", "--D", "8", "--d", "4", "--iterations", "1", "--samples", "512")
    schedule = ("--final-iterations", "2", "--final-samples", "512", "--memory", "0.9")
    polish = ("--polish-iterations", "1", "--polish-beam", "8", "--search-beam", "16")
    result = cli(*args, *schedule, *polish, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["memory"], payload["polish_iterations"], payload["search_beam"]) == (0.9, 1, 16)
    assert len(payload["history"]) == 4


def test_bench_uses_the_catalog_beam_unless_told(cli):
    base = ("lattice", "bench", "--config", "LQ-32/16", "--samples", "64", "--pad-samples", "0")
    shipped = json.loads(cli(*base, "--json").stdout)
    narrow = json.loads(cli(*base, "--beam", "8", "--json").stdout)
    assert (shipped["beam"], narrow["beam"]) == (256, 8)
    assert shipped["mse"] < narrow["mse"]


def test_bench_json_compares_with_pad_search(cli):
    result = cli(
        "lattice", "bench", "--config", "LQ-24/10", "--samples", "300", "--pad-samples", "100",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["config"] == "LQ-24/10" and row["samples"] == 300
    assert row["ours_mse_on_pad_samples"] <= 1.01 * row["pad_mse"]
    assert row["mse"] < 0.06


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("train", "--D", "10", "--d", "20"), ("LQ-10/20", "D must exceed d")),
        (("train", "--D", "33", "--d", "10"), ("LQ-33/10", "at most 32")),
        (("bench", "--config", "LQ-31/9"), ("LQ-31/9", "liftq lattice train --D 31 --d 9")),
        (("bench", "--config", "24-10"), ("24-10", "LQ-D/d")),
        (("train", "--D", "24", "--d", "10", "--init", "hadamard"), ("LQ-24/10", "orthonormal")),
        (("train", "--D", "8", "--d", "4", "--device", "tpu"), ("tpu", "cpu or cuda")),
        (("train", "--D", "8", "--d", "4", "--beam", "0"), ("beam=0",)),
        (("train", "--D", "8", "--d", "4", "--memory", "1"), ("memory=1.0", "0.99")),
        (("train", "--D", "24", "--d", "12", "--init", "blocks"), ("LQ-24/12", "LQ-16/8")),
        (("train", "--D", "8", "--d", "4", "--fit", "rows"), ("fit 'rows'", "matrix or scale")),
    ],
)
def test_bad_input_is_one_line_error(cli, args, fragments):
    assert_one_line_error(cli("lattice", *args), *fragments, code=2)


def test_error_with_json_prints_json(cli):
    result = cli("lattice", "bench", "--config", "LQ-31/9", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 2 and "LQ-31/9" in payload["error"]
