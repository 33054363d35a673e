"""Parameter counts against transformers' own modules: every preset and family variant.

The model is built on the meta device (no memory, no weights) from the same config fields,
and its parameters plus persistent buffers (DeepSeek's e_score_correction_bias, which the
checkpoint stores) are counted: liftq's shapes must match them exactly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from liftq_cli.plan.architectures import from_hf_config, param_count, presets

# Multimodal presets: their text_config is a causal LM of this model_type.
TEXT_TYPE = {"gemma3": "gemma3_text", "llama4": "llama4_text"}

VARIANTS = {
    "qwen3_5_text": {},  # transformers' defaults: Gated DeltaNet hybrid, dense MLP
    "qwen3_5_moe_text": {},  # the same with 256 experts and a gated shared expert
    "qwen3_next": {},  # fused in_proj_qkvz / in_proj_ba
    "qwen2_moe": {},
    "qwen3_moe": {"decoder_sparse_step": 2, "mlp_only_layers": [1, 5]},
    "llama4_text": {"interleave_moe_layer_step": 2},
    "llama": {"attention_bias": True},  # biases on q, k, v and o
    "deepseek_v3": {
        "q_lora_rank": None,  # q_proj straight from the hidden state
        "attention_bias": True,
        "num_hidden_layers": 5,
        "first_k_dense_replace": 2,
        "n_routed_experts": 16,
        "n_group": 4,
        "topk_group": 2,
    },
}


def hf_count(model_type: str, fields: dict) -> int:
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers())
    persistent = [buffers[n] for n in model.state_dict() if n not in params and n in buffers]
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in persistent)


@pytest.mark.parametrize("name", sorted(presets()))
def test_preset_matches_transformers(name):
    config = dict(presets()[name].config)
    model_type = config.pop("model_type")
    if "text_config" in config:
        text = config.pop("text_config")
        config = {**config, **text}
        model_type = TEXT_TYPE[model_type]
    config.pop("model_type", None)
    assert param_count(presets()[name].architecture()) == hf_count(model_type, config)


@pytest.mark.parametrize(("model_type", "fields"), sorted(VARIANTS.items()))
def test_family_variant_matches_transformers(model_type, fields):
    config = AutoConfig.for_model(model_type, **fields).to_dict()
    assert param_count(from_hf_config(config, model_type, "test")) == hf_count(model_type, fields)
