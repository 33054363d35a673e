"""Architectures: parameter counts against published numbers, presets, aliases, config.json."""

from __future__ import annotations

import json

import pytest

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.plan.architectures import (
    find_preset,
    from_hf_config,
    linears,
    param_count,
    presets,
    resolve_architecture,
)

# Publisher-stated parameter counts (model cards / safetensors metadata).
PUBLISHED = {
    "llama-2-7b": 6.738e9,
    "llama-3-8b": 8.030e9,
    "llama-3-70b": 70.554e9,
    "llama-3.1-405b": 405.85e9,
    "qwen2.5-32b": 32.76e9,
    "qwen2.5-72b": 72.71e9,
    "mistral-7b": 7.242e9,
    "mixtral-8x7b": 46.70e9,
    "gemma-2-9b": 9.24e9,
    "smollm2-135m": 134.5e6,
}

REQUIRED_PRESETS = [
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3-70b",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "llama-3.1-405b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "qwen2.5-72b",
    "qwen3-8b",
    "qwen3-14b",
    "qwen3-32b",
    "mistral-7b",
    "mixtral-8x7b",
    "gemma-2-9b",
    "gemma-2-27b",
    "smollm2-135m",
    "smollm2-360m",
    "smollm2-1.7b",
]

SMOLLM2_135M_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


@pytest.mark.parametrize(("name", "published"), sorted(PUBLISHED.items()))
def test_param_count_matches_published(name, published):
    count = param_count(resolve_architecture(name))
    assert abs(count / published - 1) < 0.005, (name, count, published)


def test_smollm2_135m_is_exact():
    assert param_count(resolve_architecture("smollm2-135m")) == 134_515_008


def test_every_required_preset_ships_and_matches_its_published_count():
    shipped = presets()
    assert set(REQUIRED_PRESETS) <= set(shipped)
    for preset in shipped.values():
        count = param_count(preset.architecture())
        assert abs(count / preset.published_params - 1) < 0.005, preset.name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("llama-70b", "llama-3-70b"),
        ("llama-8b", "llama-3-8b"),
        ("qwen-32b", "qwen2.5-32b"),
        ("LLAMA-70B", "llama-3-70b"),
        ("meta-llama/Meta-Llama-3-70B", "llama-3-70b"),  # a preset's hub id needs no network
        ("mixtral", "mixtral-8x7b"),
    ],
)
def test_aliases(alias, name):
    assert resolve_architecture(alias).name == name


def test_mixtral_quantizes_every_expert():
    arch = resolve_architecture("mixtral-8x7b")
    layer0 = [spec for spec in linears(arch) if spec.layer == 0]
    counts = {spec.kind: spec.count for spec in layer0}
    assert counts == {
        "q_proj": 1,
        "k_proj": 1,
        "v_proj": 1,
        "o_proj": 1,
        "gate_proj": 8,
        "up_proj": 8,
        "down_proj": 8,
    }
    # 8 experts x 3 x 4096 x 14336 per layer dominate the 46.7B
    assert sum(spec.params for spec in layer0) == 2 * 4096**2 + 2 * 1024 * 4096 + 24 * 4096 * 14336


def test_local_folder_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M_CONFIG))
    assert param_count(resolve_architecture(str(tmp_path))) == 134_515_008
    assert param_count(resolve_architecture(str(tmp_path / "config.json"))) == 134_515_008


def test_text_config_is_read():
    arch = from_hf_config({"model_type": "x", "text_config": SMOLLM2_135M_CONFIG}, "m", "test")
    assert (arch.hidden_size, arch.num_layers, arch.num_kv_heads) == (576, 30, 3)


def test_config_missing_fields_is_bad_input(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(BadInputError, match="lacks intermediate_size"):
        resolve_architecture(str(tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(BadInputError, match="has no config.json"):
        resolve_architecture(str(tmp_path))


def test_unknown_model_suggests():
    with pytest.raises(BadInputError, match=r"unknown model 'llama-71b'.*llama-70b.*list-models"):
        resolve_architecture("llama-71b")


def test_offline_hub_id_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ResourceError, match="not in the local Hugging Face cache"):
        resolve_architecture("nobody-liftq/not-a-model")


def test_preset_lookup_is_case_insensitive():
    assert find_preset("Qwen/Qwen2.5-32B") is find_preset("qwen2.5-32b")
