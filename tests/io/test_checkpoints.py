import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.io.checkpoints import ALIASES, _alias_gguf, materialize, resolve


def test_alias_resolves_to_the_bundled_gguf():
    source = resolve("smollm2-135m")
    assert source.kind == "alias"
    assert source.path.name == ALIASES["smollm2-135m"].filename
    with source.path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_unknown_alias_names_the_value():
    with pytest.raises(BadInputError, match="unknown model 'llama-9000'"):
        resolve("llama-9000")


def test_missing_path_names_the_value(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(BadInputError, match="does not exist"):
        resolve("missing.gguf")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="no config.json"):
        resolve(str(tmp_path))


def test_hub_id_is_recognised_but_not_fetched():
    source = resolve("HuggingFaceTB/SmolLM2-135M")
    assert source.kind == "hub" and source.repo_id == "HuggingFaceTB/SmolLM2-135M"


def test_offline_uncached_hub_id_is_a_resource_error(tmp_path):
    # A fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    code = (
        "from liftq_cli.io.checkpoints import materialize, resolve\n"
        "from liftq_cli.errors import ResourceError\n"
        "try:\n"
        "    materialize(resolve('someone/not-cached'))\n"
        "except ResourceError as exc:\n"
        "    print('RESOURCE', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "RESOURCE hub model 'someone/not-cached'" in out.stdout, out.stderr
    assert ResourceError.exit_code == 4


@pytest.mark.parametrize("kind", ["bad_magic", "truncated"])
def test_corrupt_gguf_is_refused_and_nothing_is_cached(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("LIFTQ_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    if kind == "bad_magic":
        bad.write_bytes(b"\x00" * 4096)
    else:
        with _alias_gguf("smollm2-135m").open("rb") as handle:
            bad.write_bytes(handle.read(2_000_000))
    with pytest.raises(BadInputError, match="broken.gguf"):
        materialize(resolve(str(bad)))
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not any(models.iterdir())


@pytest.mark.slow
def test_conversion_is_lossless_and_atomic(tmp_path, monkeypatch):
    """The cached fp32 folder holds exactly the tensors transformers' GGUF loader produces."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LIFTQ_CACHE", str(tmp_path))
    folder = materialize(resolve("smollm2-135m"))
    assert folder.parent == tmp_path / "models"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp leftovers
    config = (folder / "config.json").read_text()
    assert "quantization_config" not in config and '"float32"' in config
    saved = load_file(folder / "model.safetensors")
    gguf = _alias_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    reference = direct.state_dict()
    assert saved.keys() <= reference.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
    # A second resolve reuses the cache instead of converting again.
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize(resolve("smollm2-135m")) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    shutil.rmtree(folder)


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    from liftq_cli.io.atomic import cache_dir

    monkeypatch.setenv("LIFTQ_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("LIFTQ_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == Path(tmp_path) / "liftq"
