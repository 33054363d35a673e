"""`liftq lattice list|train|bench|build-catalog`: output, JSON, one-line errors and the
catalog swap of build-catalog."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tests.helpers import assert_one_line_error

from liftq_cli.lattice_config import CATALOG_CONFIGS
from liftq_cli.quant import lattice_catalog
from liftq_cli.quant.lattice_catalog import CATALOG_DIR, catalog_manifest, load_matrix_file


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


# build-catalog: training is swapped for a one-step schedule so a build takes a second.


@pytest.fixture
def fast_training(monkeypatch):
    """Catalog training at one Lloyd step on 256 slices; `calls` counts the configs."""
    real = lattice_catalog.train_matrix
    calls: list[str] = []

    def train(cfg, train, device="cpu"):
        calls.append(cfg.name)
        tiny = replace(
            train, iterations=1, samples=256, final_iterations=0, polish_iterations=0,
            train_beam=4, search_beam=4, restarts=1,
        )  # fmt: skip
        return real(cfg, tiny, eval_samples=256, device=device)

    monkeypatch.setattr(lattice_catalog, "train_matrix", train)
    return calls


@pytest.fixture
def catalog_copy(tmp_path):
    out = tmp_path / "catalog"
    shutil.copytree(CATALOG_DIR, out)
    return out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("only", [None, "LQ-16/10,LQ-17/10"])
@pytest.mark.parametrize("failure", [KeyboardInterrupt, RuntimeError])
def test_interrupted_build_leaves_the_catalog_as_it_was(
    cli, fast_training, catalog_copy, monkeypatch, only, failure
):
    before = _snapshot(catalog_copy)
    train = lattice_catalog.train_matrix

    def fail_after_first(cfg, *args, **kwargs):
        if fast_training:
            raise failure("stop")
        return train(cfg, *args, **kwargs)

    monkeypatch.setattr(lattice_catalog, "train_matrix", fail_after_first)
    args = ["lattice", "build-catalog", "--out", str(catalog_copy)]
    args += ["--only", only] if only else []
    if failure is KeyboardInterrupt:
        assert cli(*args).exit_code == 130
    else:
        with pytest.raises(RuntimeError):
            cli(*args)
    assert len(fast_training) == 1
    assert _snapshot(catalog_copy) == before
    assert sorted(p.name for p in catalog_copy.parent.iterdir()) == ["catalog"]


def test_build_catalog_needs_out_and_writes_nothing(cli, fast_training):
    before = _snapshot(CATALOG_DIR)
    siblings = sorted(CATALOG_DIR.parent.iterdir())
    result = cli("lattice", "build-catalog", "--only", "LQ-16/10")
    assert_one_line_error(result, "pass --out DIR", "src/liftq_cli/quant/catalog", code=2)
    assert fast_training == []
    assert _snapshot(CATALOG_DIR) == before and sorted(CATALOG_DIR.parent.iterdir()) == siblings


def test_only_build_keeps_the_other_entries_and_cleans_stale_staging(
    cli, fast_training, catalog_copy
):
    old_tensors = load_file(str(catalog_copy / "lattice.safetensors"))
    old_entries = json.loads((catalog_copy / "manifest.json").read_text())["entries"]
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = catalog_copy.parent / f".catalog.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "lattice.safetensors").write_bytes(b"half")
    result = cli("lattice", "build-catalog", "--out", str(catalog_copy), "--only", "LQ-16/10")
    assert result.exit_code == 0, result.output
    assert fast_training == ["LQ-16/10"]
    assert sorted(p.name for p in catalog_copy.parent.iterdir()) == ["catalog"]
    entries = catalog_manifest(catalog_copy)["entries"]
    assert [e["name"] for e in entries] == [e["name"] for e in old_entries]
    for old, new in zip(old_entries, entries, strict=True):
        assert (new["name"] == "LQ-16/10") == (new != old), new["name"]
    assert entries[[e["name"] for e in entries].index("LQ-16/10")]["iterations"] == 1
    tensors = load_file(str(catalog_copy / "lattice.safetensors"))
    assert tensors.keys() == old_tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(tensor, old_tensors[key]) == (key != "LQ-16-10"), key


def test_build_catalog_refuses_a_folder_that_is_not_a_catalog(cli, fast_training, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = cli("lattice", "build-catalog", "--out", str(tmp_path), "--only", "LQ-16/10")
    assert_one_line_error(result, str(tmp_path), "notes.txt", code=2)
    assert fast_training == [] and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_catalog_moved_aside_by_a_killed_swap_is_put_back(cli, fast_training, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    shutil.copytree(CATALOG_DIR, tmp_path / f".catalog.old.{dead.pid}")
    out = tmp_path / "catalog"
    result = cli("lattice", "build-catalog", "--out", str(out), "--only", "LQ-16/10")
    assert result.exit_code == 0, result.output
    assert len(catalog_manifest(out)["entries"]) == len(CATALOG_CONFIGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog"]
