"""Read a Hugging Face `config.json` into an `Architecture`.

Multimodal configs are read through their `text_config`: the language model is planned, a
vision or audio tower is not. Fields a config leaves out take the defaults of its family
(`model_type`), as transformers does; the traits a family's config does not spell out (Phi-3's
fused q/k/v, gpt-oss's sinks and expert biases, the gate on Qwen3.5's queries) come from the
tables below, read off transformers' modeling files. The mixture-of-experts fields go by each
family's names: `num_local_experts` (Mixtral, Llama 4, gpt-oss), `num_experts` (Qwen),
`n_routed_experts` + `n_shared_experts` + `first_k_dense_replace` (DeepSeek).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from liftq_cli.errors import BadInputError
from liftq_cli.plan.shapes import (
    FULL_ATTENTION,
    LINEAR_ATTENTION,
    Architecture,
    LatentAttention,
    LinearAttention,
)

# model_type -> (norms per block, q/k RMSNorm per head, q/k/v bias, tied embeddings by default)
_FAMILY_DEFAULTS: dict[str, tuple[int, bool, bool, bool]] = {
    "llama": (2, False, False, False),
    "mistral": (2, False, False, False),
    "mixtral": (2, False, False, False),
    "qwen2": (2, False, True, False),
    "qwen2_moe": (2, False, True, False),
    "qwen3": (2, True, False, False),
    "qwen3_moe": (2, True, False, False),
    "qwen3_next": (2, True, False, False),
    "qwen3_5_text": (2, True, False, False),
    "qwen3_5_moe_text": (2, True, False, False),
    "gemma": (2, False, False, True),
    "gemma2": (4, False, False, True),
    "gemma3_text": (4, True, False, True),
    "llama4_text": (2, False, False, False),  # its qk norm is an L2 norm without weights
    "gpt_oss": (2, False, True, False),
    "deepseek_v3": (2, False, False, False),
    "phi3": (2, False, False, False),
}
# The model_type of a multimodal wrapper -> that of its language model.
_TEXT_TYPE = {
    "gemma3": "gemma3_text",
    "llama4": "llama4_text",
    "qwen3_5": "qwen3_5_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
}
_FAMILY_TRAITS: dict[str, dict[str, bool]] = {
    "phi3": {"fused_qkv": True, "fused_gate_up": True},
    "gpt_oss": {"attention_sinks": True, "expert_bias": True, "router_bias": True},
    "deepseek_v3": {"shared_expert_gate": False, "router_bias": True},
    "llama4_text": {"shared_expert_gate": False},
    "qwen3_next": {"attn_output_gate": True},
    "qwen3_5_text": {"attn_output_gate": True},
    "qwen3_5_moe_text": {"attn_output_gate": True},
}
_QKV_ONLY_BIAS = {"qwen2", "qwen2_moe"}  # elsewhere attention_bias biases o_proj as well
# Gated DeltaNet families -> whether their input projections are fused (Qwen3-Next).
_LINEAR_ATTENTION_FUSED = {"qwen3_next": True, "qwen3_5_text": False, "qwen3_5_moe_text": False}
# transformers' Gemma3TextConfig defaults, which the google/gemma-3-{4b,12b,27b} text_configs
# rely on for the fields they leave out.
_CONFIG_DEFAULTS: dict[str, dict[str, int]] = {
    "gemma3_text": {
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "vocab_size": 262_208,
    },
}
_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def _int_field(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInputError(f"{where}: '{key}' = {value!r} must be a positive integer")
    return value


def _dense_layers(config: Mapping[str, Any], layers: int) -> tuple[int, ...]:
    """The blocks of a mixture-of-experts model that keep a dense MLP, by family."""
    if "first_k_dense_replace" in config:  # DeepSeek
        first = int(config.get("first_k_dense_replace") or 0)
        every = int(config.get("moe_layer_freq") or 1)
        return tuple(i for i in range(layers) if i < first or i % every)
    if "moe_layers" in config or "interleave_moe_layer_step" in config:  # Llama 4
        moe = config.get("moe_layers")
        if moe is None:
            step = int(config.get("interleave_moe_layer_step") or 1)
            moe = range(step - 1, layers, step)
        return tuple(i for i in range(layers) if i not in set(moe))
    only = set(config.get("mlp_only_layers") or ())  # Qwen MoE
    step = int(config.get("decoder_sparse_step") or 1)
    return tuple(i for i in range(layers) if i in only or (i + 1) % step)


def _layer_types(config: Mapping[str, Any], family: str, layers: int, where: str) -> tuple:
    """linear_attention / full_attention per block for a Gated DeltaNet hybrid, else ()."""
    if family not in _LINEAR_ATTENTION_FUSED:
        return ()  # sliding-window and chunked layers have the shapes of full attention
    types = config.get("layer_types")
    if types is None:
        every = int(config.get("full_attention_interval") or 4)
        types = [LINEAR_ATTENTION if (i + 1) % every else FULL_ATTENTION for i in range(layers)]
    legacy = {"attention": FULL_ATTENTION, "mamba": LINEAR_ATTENTION}
    types = tuple(legacy.get(t, t) for t in types)
    if len(types) != layers or not set(types) <= {FULL_ATTENTION, LINEAR_ATTENTION}:
        raise BadInputError(
            f"{where}: layer_types must list {layers} entries of linear_attention or "
            f"full_attention: check the config.json"
        )
    return types


def _linear_attention(config: Mapping[str, Any], family: str) -> LinearAttention:
    return LinearAttention(
        num_key_heads=int(config.get("linear_num_key_heads") or 16),
        num_value_heads=int(config.get("linear_num_value_heads") or 32),
        key_head_dim=int(config.get("linear_key_head_dim") or 128),
        value_head_dim=int(config.get("linear_value_head_dim") or 128),
        conv_kernel=int(config.get("linear_conv_kernel_dim") or 4),
        fused=_LINEAR_ATTENTION_FUSED[family],
    )


def _latent(config: Mapping[str, Any]) -> LatentAttention | None:
    if not config.get("kv_lora_rank"):
        return None
    return LatentAttention(
        q_lora_rank=int(config.get("q_lora_rank") or 0),
        kv_lora_rank=int(config["kv_lora_rank"]),
        qk_nope_head_dim=int(config.get("qk_nope_head_dim") or 128),
        qk_rope_head_dim=int(config.get("qk_rope_head_dim") or 64),
        v_head_dim=int(config.get("v_head_dim") or 128),
    )


def expert_count(config: Mapping[str, Any]) -> int:
    """Routed experts per MoE block from config.json fields (Mixtral's `num_local_experts`,
    Qwen's `num_experts`, DeepSeek's `n_routed_experts`); 0 for a dense model."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def from_hf_config(
    config: Mapping[str, Any],
    name: str,
    source: str,
    published_params: int | None = None,
) -> Architecture:
    """Build an `Architecture` from the fields of a Hugging Face `config.json` (see above)."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and "hidden_size" in text:
        config = {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    model_type = str(config.get("model_type", "llama"))
    family = _TEXT_TYPE.get(model_type, model_type)
    config = {**_CONFIG_DEFAULTS.get(family, {}), **config}
    experts = expert_count(config)
    required = list(_REQUIRED)
    if not (experts and config.get("moe_intermediate_size")):
        required.insert(1, "intermediate_size")  # pure MoE (Qwen3.5-MoE) has no dense MLP
    missing = [key for key in required if key not in config]
    if missing:
        raise BadInputError(
            f"{source}: config.json lacks {', '.join(missing)}: pass a decoder-only LLM config"
        )
    norms, qk_norm, qkv_bias, tied = _FAMILY_DEFAULTS.get(family, (2, False, False, False))
    hidden = _int_field(config, "hidden_size", source)
    heads = _int_field(config, "num_attention_heads", source)
    layers = _int_field(config, "num_hidden_layers", source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    latent = _latent(config)
    if latent is not None:
        head_dim = latent.qk_head_dim  # the width of one query / key head
    if "intermediate_size" in config:
        dense_inter = _int_field(config, "intermediate_size", source)
    else:  # every block a mixture of experts (Qwen3.5-MoE): no dense MLP to size
        dense_inter = int(config["moe_intermediate_size"])
    moe_inter = config.get("moe_intermediate_size") or dense_inter
    shared = config.get("shared_expert_intermediate_size") or 0
    if config.get("n_shared_experts"):  # DeepSeek: n shared experts of the routed width
        shared = int(config["n_shared_experts"]) * int(moe_inter)
    if "intermediate_size_mlp" in config:  # Llama 4: experts and shared expert at the
        moe_inter = shared = dense_inter  # intermediate_size, dense blocks at the _mlp one
        dense_inter = _int_field(config, "intermediate_size_mlp", source)
    bias = config.get("attention_bias")
    qkv_bias = qkv_bias if bias is None else bool(bias)
    layer_types = _layer_types(config, family, layers, source)
    arch = Architecture(
        name=name,
        hidden_size=hidden,
        intermediate_size=dense_inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=_int_field(config, "vocab_size", source),
        tie_embeddings=bool(config.get("tie_word_embeddings", tied)),
        num_experts=int(experts),
        experts_per_token=int(config.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(moe_inter) if experts else 0,
        shared_expert_intermediate_size=int(shared) if experts else 0,
        qkv_bias=qkv_bias,
        norms_per_layer=norms,
        qk_norm=qk_norm,
        model_type=model_type,
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        published_params=published_params,
        source=source,
        dense_layers=_dense_layers(config, layers) if experts else (),
        o_bias=qkv_bias and family not in _QKV_ONLY_BIAS,
        latent=latent,
        linear_attention=_linear_attention(config, family) if layer_types else None,
        layer_types=layer_types,
        **_FAMILY_TRAITS.get(family, {}),
    )
    if arch.num_heads % arch.num_kv_heads:
        raise BadInputError(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}: check the config.json"
        )
    return arch
