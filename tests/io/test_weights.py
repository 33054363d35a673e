"""`WeightReader`: one tensor at a time from a single or sharded safetensors folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from liftq_cli.errors import BadInputError
from liftq_cli.io.weights import WeightReader


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(5, 6, generator=g),
        "model.layers.0.mlp.up_proj.bias": torch.randn(5, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(5, 6, generator=g).bfloat16(),
        "lm_head.weight": torch.randn(11, 6, generator=g),
    }


def _single(folder, weights):
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    return folder


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _sharded(folder, weights):
    folder.mkdir()
    names = list(weights)
    split = {SHARDS[0]: names[:2], SHARDS[1]: names[2:]}
    for shard, keys in split.items():
        save_file({k: weights[k] for k in keys}, str(folder / shard))
    weight_map = {name: shard for shard, keys in split.items() for name in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(params=["single", "sharded"])
def folder(request, tmp_path):
    make = _single if request.param == "single" else _sharded
    return make(tmp_path / request.param, _weights())


def test_names_membership_shape_and_get(folder):
    weights = _weights()
    reader = WeightReader(folder)
    assert sorted(reader.names()) == sorted(weights)
    assert "model.layers.0.mlp.up_proj.weight" in reader
    assert "model.layers.0.mlp.down_proj.weight" not in reader
    for name, tensor in weights.items():
        assert reader.shape(name) == tuple(tensor.shape), name
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_sharded_names_follow_the_index_and_read_from_their_shard(tmp_path):
    weights = _weights()
    reader = WeightReader(_sharded(tmp_path / "m", weights))
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert reader.names() == list(index["weight_map"])
    assert torch.equal(reader.get("lm_head.weight"), weights["lm_head.weight"])  # 2nd shard


def test_fingerprint_is_the_size_and_leading_bytes_of_each_weight_file(folder):
    reader = WeightReader(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    assert [int(v.split(":")[0]) for v in reader.fingerprint().values()] == [
        p.stat().st_size for p in files
    ]
    assert list(reader.fingerprint()) == [p.name for p in files]


def test_fingerprint_tells_apart_two_checkpoints_of_the_same_size(folder):
    # two fine-tunes of one base model: same names, shapes and dtypes, so the same file sizes
    before = WeightReader(folder).fingerprint()
    target = max(folder.glob("*.safetensors"))
    tensors = load_file(target)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    size = target.stat().st_size
    save_file(tensors, str(target))
    assert target.stat().st_size == size
    assert WeightReader(folder).fingerprint()[target.name] != before[target.name]


def test_fingerprint_changes_when_a_weight_file_changes(folder):
    before = WeightReader(folder).fingerprint()
    target = max(folder.glob("*.safetensors"))  # the only file, or the last shard
    tensors = load_file(target)
    name = next(iter(tensors))
    tensors[name] = torch.cat([tensors[name], tensors[name]])  # a larger checkpoint
    save_file(tensors, str(target))
    after = WeightReader(folder).fingerprint()
    assert after != before
    assert {k for k in after if after[k] != before[k]} == {target.name}


def test_index_wins_over_a_stray_single_file(tmp_path):
    weights = _weights()
    folder = _sharded(tmp_path / "m", weights)
    save_file({"stray": torch.zeros(1)}, str(folder / "model.safetensors"))
    reader = WeightReader(folder)
    assert "stray" not in reader and sorted(reader.names()) == sorted(weights)
    assert "model.safetensors" not in reader.fingerprint()


def test_folder_without_safetensors_is_bad_input(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(BadInputError, match="has no safetensors weights: convert it"):
        WeightReader(tmp_path)
