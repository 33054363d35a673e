"""Architectures: parameter counts against published numbers, presets, aliases, config.json."""

from __future__ import annotations

import json

import pytest

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.plan.architectures import (
    active_param_count,
    find_preset,
    from_hf_config,
    layer_linears,
    linears,
    other_params,
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
    # Gemma 3: the language model (the technical report's embedding + non-embedding columns)
    "gemma-3-270m": 268.1e6,
    "gemma-3-1b": 1.000e9,
    "gemma-3-4b": 3.884e9,
    "gemma-3-12b": 11.771e9,
    "gemma-3-27b": 27.016e9,
    "qwen3-30b-a3b": 30.5e9,
    "qwen3-235b-a22b": 235e9,
    "mixtral-8x22b": 141e9,
    "llama-4-scout": 109e9 - 0.872e9,  # Meta's 109B less the vision encoder and projector
    "gpt-oss-20b": 20.91e9,
    "gpt-oss-120b": 116.83e9,
    "deepseek-v3": 671e9,  # the main model; the 14B MTP module is not part of it
    "phi-3-mini-4k": 3.821e9,
}

# Publisher-stated active parameters per token of the mixtures of experts, with the unit of
# the last digit stated: a figure given to two significant digits (3.3B, 22B, 37B) is checked
# to within that unit, one given to three within 0.5%. gpt-oss's card leaves the embedding
# table out of its count; the others count it.
PUBLISHED_ACTIVE = {
    "mixtral-8x7b": (12.9e9, 0.1e9),
    "mixtral-8x22b": (39e9, 1e9),
    "qwen3-30b-a3b": (3.3e9, 0.1e9),
    "qwen3-235b-a22b": (22e9, 1e9),
    "llama-4-scout": (17e9, 1e9),
    "gpt-oss-20b": (3.61e9, 0.01e9),
    "gpt-oss-120b": (5.13e9, 0.01e9),
    "deepseek-v3": (37e9, 1e9),
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
    "gemma-3-270m",
    "gemma-3-1b",
    "gemma-3-4b",
    "gemma-3-12b",
    "gemma-3-27b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "mixtral-8x22b",
    "llama-4-scout",
    "gpt-oss-20b",
    "gpt-oss-120b",
    "deepseek-v3",
    "phi-3-mini-4k",
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


def _active_tolerance(published: float, unit: float) -> float:
    digits = len(f"{published / unit:.0f}")
    return 0.005 * published if digits >= 3 else unit


@pytest.mark.parametrize(("name", "published"), sorted(PUBLISHED_ACTIVE.items()))
def test_active_params_match_published(name, published):
    value, unit = published
    preset = find_preset(name)
    count = active_param_count(preset.architecture(), embedding=preset.active_counts_embedding)
    assert abs(count - value) <= _active_tolerance(value, unit), (name, count, value)
    assert preset.published_active_params == value


def test_every_moe_preset_states_its_active_count():
    for preset in presets().values():
        arch = preset.architecture()
        assert (preset.published_active_params is not None) == arch.is_moe, preset.name
        if arch.is_moe:
            assert preset.name in PUBLISHED_ACTIVE
            assert active_param_count(arch) < param_count(arch)


def test_dense_active_is_total():
    arch = resolve_architecture("llama-3-8b")
    assert active_param_count(arch) == param_count(arch)
    assert active_param_count(arch, embedding=False) == param_count(arch) - 128256 * 4096


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
        ("qwen3-moe-30b-a3b", "qwen3-30b-a3b"),
        ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b"),
        ("llama4-scout", "llama-4-scout"),
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


def test_qwen3_moe_counts_every_expert():
    arch = resolve_architecture("qwen3-30b-a3b")
    counts = {spec.kind: (spec.count, spec.routed) for spec in layer_linears(arch, 0)}
    assert counts["gate_proj"] == counts["down_proj"] == (128, True)
    assert counts["q_proj"] == (1, False) and "shared_gate_proj" not in counts
    assert arch.moe_layers == 48 and arch.qk_norm
    # 48 x (attention 18.9M + 128 experts of 3 x 2048 x 768) + 2 x 151936 x 2048 + the rest
    assert param_count(arch) == 30_532_122_624
    assert active_param_count(arch) == 30_532_122_624 - 48 * 120 * 3 * 2048 * 768


def test_deepseek_v3_latent_attention_dense_then_moe():
    arch = resolve_architecture("deepseek-v3")
    assert arch.dense_layers == (0, 1, 2) and arch.moe_layers == 58
    dense = {spec.kind: (spec.out_features, spec.in_features) for spec in layer_linears(arch, 0)}
    assert dense == {
        "q_a_proj": (1536, 7168),
        "q_b_proj": (128 * 192, 1536),
        "kv_a_proj_with_mqa": (512 + 64, 7168),
        "kv_b_proj": (128 * (128 + 128), 512),
        "o_proj": (7168, 128 * 128),
        "gate_proj": (18432, 7168),
        "up_proj": (18432, 7168),
        "down_proj": (7168, 18432),
    }
    moe = {spec.kind: (spec.out_features, spec.count) for spec in layer_linears(arch, 3)}
    assert moe["gate_proj"] == (2048, 256) and moe["shared_gate_proj"] == (2048, 1)
    assert not arch.shared_expert_gate and arch.router_bias


def test_llama4_scout_every_block_routes_plus_a_shared_expert():
    arch = resolve_architecture("llama-4-scout")
    assert (arch.num_experts, arch.experts_per_token, arch.moe_layers) == (16, 1, 48)
    assert arch.moe_intermediate_size == arch.shared_expert_intermediate_size == 8192
    assert arch.intermediate_size == 16384 and not arch.qk_norm  # L2 norm: no weights
    interleaved = from_hf_config(
        {**find_preset("llama-4-scout").config["text_config"], "interleave_moe_layer_step": 2},
        "maverick-like",
        "test",
    )
    assert interleaved.dense_layers == tuple(range(0, 48, 2))
    assert {s.kind: s.out_features for s in layer_linears(interleaved, 0)}["up_proj"] == 16384


def test_gpt_oss_sinks_and_biases():
    arch = resolve_architecture("gpt-oss-20b")
    assert arch.attention_sinks and arch.expert_bias and arch.router_bias and arch.o_bias
    h, heads, q, kv, experts, inter = 2880, 64, 64 * 64, 8 * 64, 32, 2880
    per_layer = (
        2 * h  # norms
        + heads  # sinks
        + q
        + 2 * kv
        + h  # q/k/v/o biases
        + experts * h
        + experts  # router and its bias
        + experts * (2 * inter + h)  # expert biases
    )
    assert other_params(arch) == 24 * per_layer + h


def test_phi3_fused_linears_count_as_separate_ones():
    fused = resolve_architecture("phi-3-mini-4k")
    kinds = [spec.kind for spec in layer_linears(fused, 0)]
    assert kinds == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    split = from_hf_config({**find_preset("phi-3-mini-4k").config, "model_type": "llama"}, "x", "t")
    assert param_count(fused) == param_count(split) == 3_821_079_552


def test_qwen3_5_hybrid_layers():
    """Qwen3.5-MoE (transformers' Qwen3_5MoeTextConfig defaults): 3 Gated DeltaNet blocks,
    then one gated full-attention block, ten times; every block 256 experts + a shared one."""
    config = {
        "model_type": "qwen3_5_moe",
        "text_config": {
            "model_type": "qwen3_5_moe_text",
            "hidden_size": 2048,
            "num_hidden_layers": 40,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "head_dim": 256,
            "moe_intermediate_size": 512,
            "shared_expert_intermediate_size": 512,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "vocab_size": 248320,
        },
    }
    arch = from_hf_config(config, "qwen3.5-35b-a3b", "test")
    assert arch.attention_layers == 10 and arch.layer_types[:4] == (
        "linear_attention",
        "linear_attention",
        "linear_attention",
        "full_attention",
    )
    linear = {s.kind: (s.out_features, s.in_features) for s in layer_linears(arch, 0)}
    assert linear["in_proj_qkv"] == (2 * 16 * 128 + 32 * 128, 2048)
    assert linear["in_proj_z"] == (32 * 128, 2048) and linear["out_proj"] == (2048, 4096)
    full = {s.kind: (s.out_features, s.in_features) for s in layer_linears(arch, 3)}
    assert full["q_proj"] == (2 * 16 * 256, 2048)  # queries and their output gate
    assert param_count(arch) == 34_660_610_688  # transformers' Qwen3_5MoeForCausalLM


def test_bad_layer_types_is_bad_input():
    config = {**find_preset("qwen3-30b-a3b").config, "model_type": "qwen3_next"}
    with pytest.raises(BadInputError, match="layer_types must list 48"):
        from_hf_config({**config, "layer_types": ["full_attention"]}, "x", "test")


def test_gemma3_text_config_takes_the_family_defaults():
    # google/gemma-3-4b's text_config leaves heads, head_dim and vocabulary to transformers
    config = {
        "model_type": "gemma3",
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "num_hidden_layers": 34,
        },
    }
    arch = from_hf_config(config, "gemma-3-4b", "test")
    assert param_count(arch) == param_count(resolve_architecture("gemma-3-4b"))


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
