"""Tiny random-weight decoders of the architectures liftq quantizes without knowing them by
name, built from their transformers configs (hidden 64, 2 blocks, 256-token vocabulary), and
the ones it refuses, with the reason it gives."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 8  # sliding window of the local-attention layers: shorter than the test windows

# model_type -> the fields that make the tiny model exercise what is special about it
SUPPORTED = {
    "llama": {},
    "qwen3": {},  # q/k RMSNorm per head
    "gemma3_text": {  # sliding and full layers with their own rotary tables, 4 norms per block
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gemma4_text": {  # as gemma3, plus per-layer-type head dims; no per-layer embeddings
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
        "hidden_size_per_layer_input": 0,
        "global_head_dim": 32,
    },
    "qwen3_5_text": {  # Gated DeltaNet linear attention then a gated full-attention layer
        "layer_types": ["linear_attention", "full_attention"],
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
    },
    "phi3": {},  # fused qkv_proj and gate_up_proj: each quantized as one linear
}

# mixture-of-experts decoders: experts fused as 3-D tensors in transformers, stored per expert
# (Qwen3-MoE; Mixtral under its legacy names w1/w3/w2) or fused (gpt-oss, Llama 4)
EXPERTS = {
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # [E, H, 2I] transposed, gate and up interleaved, biases, clamped GLU, a router bias
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2},
    # router-scaled rows, a shared expert, nn.Linear router (kept in high precision)
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1},
}
SUPPORTED.update(EXPERTS)

# model_type -> (fields, a fragment of the refusal)
REFUSED = {
    "gemma4_text": (
        {"hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256},
        "per-layer embeddings",
    ),
}


def tiny_config(model_type: str, **fields):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **fields})


def save_tiny(folder: Path, model_type: str, fields: dict | None = None) -> Path:
    """A random-weight model of `model_type` saved to `folder` (float32)."""
    from transformers import AutoModelForCausalLM

    fields = SUPPORTED.get(model_type, {}) if fields is None else fields
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **fields))
    with torch.no_grad():  # norms away from 1 and biases away from 0: a wrong load shows
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    return folder
