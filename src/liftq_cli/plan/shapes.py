"""Decoder shapes: every linear of every block, and the parameter counts they add up to.

An `Architecture` holds the few `config.json` fields that fix a decoder's memory. A block is
attention plus an MLP, each in one of a few variants:

* attention: grouped-query q/k/v/o (Llama; Phi-3 fuses q/k/v into one `qkv_proj`; Qwen3.5
  doubles q_proj for an output gate), multi-head latent attention (DeepSeek-V3: q and kv pass
  through low-rank latents, `LatentAttention`) or, in the layers `layer_types` marks
  `linear_attention`, Gated DeltaNet (Qwen3-Next, Qwen3.5: `LinearAttention`);
* MLP: dense gate/up/down (Phi-3 fuses gate and up), or mixture of experts: `num_experts`
  routed experts of `moe_intermediate_size`, `experts_per_token` of them active, plus an
  optional shared expert; MoE models may keep dense MLPs in `dense_layers` (DeepSeek-V3's
  first three blocks, Llama 4 Maverick's interleave).

`layer_linears` lists the weight matrices LiftQuant quantizes. Everything else (embeddings,
lm_head, norms, biases, routers, attention sinks, the small gating projections and
convolutions of linear attention) is counted by `other_params`, priced at its own precision.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
SHARED_MLP_KINDS = ("shared_gate_proj", "shared_up_proj", "shared_down_proj")
FUSED_KINDS = ("qkv_proj", "gate_up_proj")  # Phi-3
LATENT_KINDS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # DeepSeek MLA
LINEAR_ATTENTION_KINDS = ("in_proj_qkvz", "in_proj_qkv", "in_proj_z", "out_proj")  # DeltaNet
LINEAR_KINDS = (
    ATTENTION_KINDS + MLP_KINDS + SHARED_MLP_KINDS + FUSED_KINDS + LATENT_KINDS
) + LINEAR_ATTENTION_KINDS
"""Canonical linear names; MoE experts of one layer share their kind (`gate_proj` covers the
gate linear of every expert: HF Mixtral calls them experts.N.w1/w3/w2)."""

FULL_ATTENTION = "full_attention"
LINEAR_ATTENTION = "linear_attention"


@dataclass(frozen=True)
class LatentAttention:
    """Multi-head latent attention (DeepSeek-V2/V3): ranks and per-head dims."""

    q_lora_rank: int  # 0: q_proj straight from the hidden state
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class LinearAttention:
    """Gated DeltaNet heads of the `linear_attention` layers (Qwen3-Next, Qwen3.5)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    fused: bool  # Qwen3-Next: in_proj_qkvz + in_proj_ba; Qwen3.5: qkv, z, b, a apart

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal depthwise convolution over q, k and v."""
        return 2 * self.key_dim + self.value_dim

    @property
    def state_elements(self) -> int:
        """Per sequence: the convolution window and the (k x v) recurrent state per head."""
        heads = self.num_value_heads * self.key_head_dim * self.value_head_dim
        return self.conv_dim * self.conv_kernel + heads


@dataclass(frozen=True)
class Architecture:
    """Decoder shapes that determine memory. Sizes are element counts, not bytes."""

    name: str
    hidden_size: int
    intermediate_size: int  # of the dense MLPs
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    model_type: str = "llama"
    max_position_embeddings: int = 0
    published_params: int | None = None
    source: str = "preset"
    dense_layers: tuple[int, ...] = ()  # MoE models: blocks with a dense MLP instead
    shared_expert_gate: bool = True  # Qwen-MoE: sigmoid(1 x hidden) gate on the shared expert
    expert_bias: bool = False  # gpt-oss: biases on every expert's linears
    router_bias: bool = False  # gpt-oss bias, DeepSeek-V3 e_score_correction_bias
    o_bias: bool = False
    attention_sinks: bool = False  # gpt-oss: one learned logit per head
    attn_output_gate: bool = False  # Qwen3-Next/3.5: q_proj also emits a gate per element
    fused_qkv: bool = False
    fused_gate_up: bool = False
    latent: LatentAttention | None = None
    linear_attention: LinearAttention | None = None
    layer_types: tuple[str, ...] = ()  # empty: every block full attention

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer not in self.dense_layers

    def is_linear_attention(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == LINEAR_ATTENTION

    @property
    def moe_layers(self) -> int:
        """How many blocks route to experts."""
        return sum(self.is_moe_layer(layer) for layer in range(self.num_layers))

    @property
    def attention_layers(self) -> int:
        """How many blocks keep a KV cache (all but the linear-attention ones)."""
        return sum(not self.is_linear_attention(layer) for layer in range(self.num_layers))


@dataclass(frozen=True)
class LinearSpec:
    """One linear kind of one layer: `count` matrices of shape (out_features, in_features).

    `routed`: the matrices are routed experts, of which `experts_per_token` run per token.
    """

    layer: int
    kind: str
    out_features: int
    in_features: int
    count: int = 1
    routed: bool = False

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count


def _attention_linears(arch: Architecture, layer: int) -> list[LinearSpec]:
    h = arch.hidden_size
    if arch.is_linear_attention(layer):
        lin = arch.linear_attention
        assert lin is not None, "linear_attention layer without LinearAttention shapes"
        if lin.fused:
            inputs = [LinearSpec(layer, "in_proj_qkvz", lin.conv_dim + lin.value_dim, h)]
        else:
            inputs = [
                LinearSpec(layer, "in_proj_qkv", lin.conv_dim, h),
                LinearSpec(layer, "in_proj_z", lin.value_dim, h),
            ]
        return [*inputs, LinearSpec(layer, "out_proj", h, lin.value_dim)]
    if arch.latent is not None:
        mla, heads = arch.latent, arch.num_heads
        if mla.q_lora_rank:
            query = [
                LinearSpec(layer, "q_a_proj", mla.q_lora_rank, h),
                LinearSpec(layer, "q_b_proj", heads * mla.qk_head_dim, mla.q_lora_rank),
            ]
        else:
            query = [LinearSpec(layer, "q_proj", heads * mla.qk_head_dim, h)]
        return [
            *query,
            LinearSpec(layer, "kv_a_proj_with_mqa", mla.kv_lora_rank + mla.qk_rope_head_dim, h),
            LinearSpec(
                layer,
                "kv_b_proj",
                heads * (mla.qk_nope_head_dim + mla.v_head_dim),
                mla.kv_lora_rank,
            ),
            LinearSpec(layer, "o_proj", h, heads * mla.v_head_dim),
        ]
    q_out = arch.q_dim * (2 if arch.attn_output_gate else 1)
    if arch.fused_qkv:
        qkv = [LinearSpec(layer, "qkv_proj", q_out + 2 * arch.kv_dim, h)]
    else:
        qkv = [
            LinearSpec(layer, "q_proj", q_out, h),
            LinearSpec(layer, "k_proj", arch.kv_dim, h),
            LinearSpec(layer, "v_proj", arch.kv_dim, h),
        ]
    return [*qkv, LinearSpec(layer, "o_proj", h, arch.q_dim)]


def _mlp_linears(arch: Architecture, layer: int) -> list[LinearSpec]:
    h = arch.hidden_size
    if not arch.is_moe_layer(layer):
        inter = arch.intermediate_size
        if arch.fused_gate_up:
            return [
                LinearSpec(layer, "gate_up_proj", 2 * inter, h),
                LinearSpec(layer, "down_proj", h, inter),
            ]
        return [
            LinearSpec(layer, "gate_proj", inter, h),
            LinearSpec(layer, "up_proj", inter, h),
            LinearSpec(layer, "down_proj", h, inter),
        ]
    inter, count = arch.moe_intermediate_size, arch.num_experts
    specs = [
        LinearSpec(layer, "gate_proj", inter, h, count, routed=True),
        LinearSpec(layer, "up_proj", inter, h, count, routed=True),
        LinearSpec(layer, "down_proj", h, inter, count, routed=True),
    ]
    if arch.shared_expert_intermediate_size:
        shared = arch.shared_expert_intermediate_size
        specs += [
            LinearSpec(layer, "shared_gate_proj", shared, h),
            LinearSpec(layer, "shared_up_proj", shared, h),
            LinearSpec(layer, "shared_down_proj", h, shared),
        ]
    return specs


def layer_linears(arch: Architecture, layer: int) -> list[LinearSpec]:
    """The quantized linears of decoder block `layer`, attention first."""
    return _attention_linears(arch, layer) + _mlp_linears(arch, layer)


def linears(arch: Architecture) -> list[LinearSpec]:
    """Every quantized linear of the model, layer by layer."""
    return [spec for layer in range(arch.num_layers) for spec in layer_linears(arch, layer)]


def _attention_other(arch: Architecture, layer: int) -> int:
    """Norm weights, biases, sinks and (linear attention) gates and convolution of a block."""
    h = arch.hidden_size
    if arch.is_linear_attention(layer):
        lin = arch.linear_attention
        assert lin is not None, "linear_attention layer without LinearAttention shapes"
        # in_proj_b / in_proj_a (fused: in_proj_ba): one beta and one decay input per v head;
        # dt_bias and A_log per v head; the gated RMSNorm over a v head; the conv weights.
        heads = lin.num_value_heads
        return 2 * heads * h + 2 * heads + lin.value_head_dim + lin.conv_dim * lin.conv_kernel
    other = arch.num_heads if arch.attention_sinks else 0
    if arch.latent is not None:
        mla = arch.latent
        other += mla.q_lora_rank + mla.kv_lora_rank  # q_a_layernorm, kv_a_layernorm
        if arch.qkv_bias:  # HF: attention_bias puts a bias on q_a_proj and kv_a_proj
            other += mla.q_lora_rank + mla.kv_lora_rank + mla.qk_rope_head_dim
        return other + (h if arch.o_bias else 0)
    if arch.qk_norm:
        other += 2 * arch.head_dim
    if arch.qkv_bias:
        other += arch.q_dim * (2 if arch.attn_output_gate else 1) + 2 * arch.kv_dim
    return other + (h if arch.o_bias else 0)


def _expert_params(arch: Architecture) -> int:
    """Weights and biases of one routed expert."""
    h, inter = arch.hidden_size, arch.moe_intermediate_size
    return 3 * h * inter + ((2 * inter + h) if arch.expert_bias else 0)


def other_params(arch: Architecture) -> int:
    """Parameters outside linears and embeddings, kept in fp16: norms, biases, MoE routers."""
    h = arch.hidden_size
    total = h  # final norm
    for layer in range(arch.num_layers):
        total += arch.norms_per_layer * h + _attention_other(arch, layer)
        if arch.is_moe_layer(layer):
            total += arch.num_experts * h  # router
            total += arch.num_experts if arch.router_bias else 0
            if arch.expert_bias:
                total += arch.num_experts * (2 * arch.moe_intermediate_size + h)
            if arch.shared_expert_intermediate_size and arch.shared_expert_gate:
                total += h  # shared-expert gate (1 x hidden)
    return total


def embedding_params(arch: Architecture) -> int:
    return arch.vocab_size * arch.hidden_size


def param_count(arch: Architecture) -> int:
    """Total parameters as published: linears, embeddings, lm_head (unless tied) and the rest.

    A mixture of experts counts every expert: all of them are resident on the GPU.
    """
    lm_head = 0 if arch.tie_embeddings else embedding_params(arch)
    linear = sum(spec.params for spec in linears(arch))
    return linear + embedding_params(arch) + lm_head + other_params(arch)


def active_param_count(arch: Architecture, embedding: bool = True) -> int:
    """Parameters one token runs through: `param_count` less the routed experts it skips.

    Each MoE block runs `experts_per_token` of its `num_experts` routed experts (plus the
    shared expert, counted in full). `embedding=False` leaves out the embedding table (a
    lookup of one row; the lm_head stays, and a tied table is the lm_head), as OpenAI counts
    gpt-oss; Mistral, Qwen and Meta count it. Dense models: `param_count` (less the table).
    """
    idle = max(arch.num_experts - arch.experts_per_token, 0) * _expert_params(arch)
    active = param_count(arch) - arch.moe_layers * idle
    if embedding or arch.tie_embeddings:  # a tied table is the lm_head too: it runs
        return active
    return active - embedding_params(arch)
