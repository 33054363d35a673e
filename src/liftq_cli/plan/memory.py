"""GPU memory model of a LiftQuant model: packed weights, embeddings, KV cache and runtime.

Packed layout of one quantized linear W (out_features o, in_features i) at lattice LQ-D/d:
the closed formula lives in `liftq_cli.io.packed_format` (the module that defines the tensors
`liftq pack` writes) and is re-exported here, so the plan and the packed file agree:

* codes: each row is cut into n = ceil(i / d) slices of D sign bits; a row's n * D bits are
  packed into 32-bit words: ceil(n * D / 32) * 4 bytes per row, times o rows;
* scales: one fp16 scale per row, 2 * o bytes;
* whitening factors (fp16): vectors s1, s2 of length i and orthogonal P1 (p1 x p1),
  P2 (p2 x p2) with p1 * p2 = i, p1 <= p2 the divisor pair closest to sqrt(i):
  2 * (2 * i + p1^2 + p2^2) bytes;
* each lattice matrix M (d x D, float32) used by the model is stored once: 4 * d * D bytes.

The embedding and lm_head are priced from the tensors `liftq pack --embed/--lm-head` writes
(`io.embedding_format`: fp16 2 r c, int8 r c + 2 r, int4 r ceil(c/2) + 2 r ceil(c/128) for
r = vocab, c = hidden; `host` keeps the fp16 table in host RAM, 0 bytes on the GPU; a tied
pair at one precision is stored once). Everything else is priced by `MemorySettings`: norms,
biases and routers at fp16, the KV cache for ctx x batch at kv_bits (plus the fixed state of
linear-attention layers), and a runtime overhead (CUDA context, workspaces, prefill
activations). A mixture of experts is priced with every expert resident. All sizes are bytes
(int); all functions are pure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from liftq_cli.errors import BadInputError
from liftq_cli.io.embedding_format import (
    DEFAULT_EMBED,
    DEFAULT_LM_HEAD,
    EMBED_CHOICES,
    INT4_GROUP,
    LM_HEAD_CHOICES,
    EmbeddingLayout,
    stored_matrix_bytes,
)
from liftq_cli.io.embedding_format import embedding_bytes as stored_embedding_bytes
from liftq_cli.io.packed_format import lattice_matrix_bytes, packed_linear_bytes
from liftq_cli.io.packed_format import whitening_factors as whitening_factors
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import Architecture, LinearSpec, linears
from liftq_cli.plan.architectures import other_params as _other_params

FP16 = 2
KIB, MIB, GIB = 2**10, 2**20, 2**30

PRECISIONS: tuple[str, ...] = EMBED_CHOICES  # --embed choices; --lm-head: LM_HEAD_CHOICES
KV_BITS = (16, 8, 4)

# The paper's evaluation context, and the one its headline claim (Llama-3-70B at 2.4 bits on a
# 24 GB GPU) holds at; --ctx plans for longer chats (4096: 2.3 bits there).
DEFAULT_CTX = 2048
DEFAULT_BATCH = 1
DEFAULT_KV_BITS = 16
DEFAULT_CUDA_CONTEXT = 700 * MIB  # an estimate, see ASSUMPTION_NOTES
DEFAULT_WORKSPACE = 128 * MIB
DEFAULT_PREFILL_CHUNK = 512
MAX_SIZE = 10**15  # 1 PB: far beyond any node; a larger value is a typo
MIN_VRAM = 64 * MIB  # below this a --vram value is a forgotten unit, not a GPU

ASSUMPTION_NOTES: dict[str, str] = {
    "embed": "host: the token embedding stays in host RAM, pinned under CUDA (each step "
    "gathers its tokens' rows there and copies them over, as llama.cpp does); fp16/int8/int4 "
    "keep it on the GPU; `liftq pack --embed` writes the same choice",
    "lm_head": "int8 with one fp16 scale per row (llama.cpp keeps output.weight at 6+ bits "
    "in its 2-bit mixes), int4 with one fp16 scale per 128 weights; fp16 is the unquantized "
    "choice; `liftq pack --lm-head` writes the same choice. A tied lm_head at the embedding's "
    "precision is stored once (under embed); at another precision it is a separate copy",
    "kv_cache": "every attention layer caches the full ctx (sliding-window layers are not "
    "trimmed); kv_bits < 16 adds one fp16 scale per head and token; latent attention "
    "(DeepSeek-V3) caches its kv latent and rope key; linear-attention layers keep a fixed "
    "fp16 state per sequence instead (linear_state)",
    "cuda_context": "an estimate, not measured by liftq: the memory a torch + cuBLAS + "
    "Triton process holds outside the caching allocator is typically 0.5 to 1 GiB, by GPU, "
    "driver and CUDA version; read yours from nvidia-smi after one forward and pass "
    "--cuda-context",
    "workspace": "cuBLAS workspace (32 MiB on Hopper), attention scratch and "
    "caching-allocator slack",
    "activations": "peak fp16 activations of one decoder block for a prefill chunk, fused "
    "(flash) attention, fp32 logits of the last position only",
}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str, option: str = "--vram", minimum: int = 1) -> int:
    """Parse a memory size to bytes.

    `GB`, `MB`, `KB`, `TB` are decimal (24GB = 24e9 bytes); `GiB`, `MiB`, ... are binary
    (24GiB = 24 * 2**30). A bare `G`, `M`, `K`, `T` is binary, as nvidia-smi, `free -g` and
    docker use it (24G = 24GiB). A plain integer is bytes. Case is ignored. A result below
    `minimum` bytes is refused (a forgotten unit: `--vram 24`).
    """
    match = _SIZE.match(str(text))
    if not match:
        raise BadInputError(
            f"{option} '{text}' is not a size: use a number with a unit, e.g. 24GB, 24GiB, "
            f"24000MB, 24G or a byte count"
        )
    number, prefix, binary, byte = match.groups()
    prefix = prefix.lower()
    if not prefix and binary:
        raise BadInputError(f"{option} '{text}' is not a size: use e.g. 24GiB or 24GB")
    base = 1024 if (binary or (prefix and not byte)) else 1000
    value = float(number) * base ** _POWER[prefix]
    if not math.isfinite(value) or value < 1:
        raise BadInputError(f"{option} '{text}' must be a positive size, e.g. 24GB")
    if value > MAX_SIZE:
        raise BadInputError(
            f"{option} '{text}' is {value:.3g} bytes, more than any GPU set-up (at most "
            f"{format_bytes(MAX_SIZE)}): check the number and the unit"
        )
    if value < minimum:
        if prefix:  # it has a unit, just a small one
            raise BadInputError(
                f"{option} '{text}' is {format_bytes(int(value))}, less than the "
                f"{minimum // MIB} MiB any GPU has: did you mean {number}GB?"
            )
        raise BadInputError(
            f"{option} '{text}' is only {int(value):,} bytes: add a unit, e.g. {number}GB or "
            f"{number}GiB"
        )
    return int(value)


def format_bytes(n: int) -> str:
    """'23.92 GB' style, decimal units (the unit `--vram 24GB` is read in)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def matrix_bytes(rows: int, cols: int, precision: str) -> int:
    """GPU bytes of a (rows, cols) embedding-like matrix at `precision` (host: 0 on the GPU).

    The bytes of the tensors `liftq pack` writes (`io.embedding_format.stored_matrix_bytes`):
    int8 one fp16 scale per row; int4 packed nibbles plus one fp16 scale per 128 weights.
    """
    if precision == "host":
        return 0
    return stored_matrix_bytes(rows, cols, precision, INT4_GROUP)


def kv_cache_bytes(arch: Architecture, ctx: int, batch: int, kv_bits: int) -> int:
    """K and V of every attention layer for `batch` sequences of `ctx` tokens at `kv_bits`.

    Latent attention (DeepSeek-V3) caches its compressed kv latent and the shared rope key,
    as transformers does (kv_lora_rank + qk_rope_head_dim per token, two one-head tensors);
    linear-attention layers cache no K/V (`linear_state_bytes`).
    """
    layers = arch.attention_layers
    if arch.latent is not None:
        per_token, heads = arch.latent.kv_lora_rank + arch.latent.qk_rope_head_dim, 2
    else:
        per_token, heads = 2 * arch.kv_dim, 2 * arch.num_kv_heads
    elements = layers * batch * ctx * per_token
    scales = 0 if kv_bits == 16 else layers * batch * ctx * heads * FP16
    return elements * kv_bits // 8 + scales


def linear_state_bytes(arch: Architecture, batch: int) -> int:
    """Gated DeltaNet layers: an fp16 convolution window and recurrent state per sequence,
    whatever the context length."""
    lin = arch.linear_attention
    if lin is None:
        return 0
    return FP16 * batch * (arch.num_layers - arch.attention_layers) * lin.state_elements


def activation_bytes(arch: Architecture, chunk: int, batch: int) -> int:
    """Peak fp16 activations of one decoder block while prefilling `chunk` tokens.

    Residual + normed input (2h), q/k/v, attention output, gate/up/product of the MLP (the
    active experts for MoE), one decode scratch the size of the widest input, and the fp32
    logits of the last position.
    """
    inter = arch.intermediate_size if arch.moe_layers < arch.num_layers else 0
    if arch.is_moe:
        routed = arch.moe_intermediate_size * max(1, arch.experts_per_token)
        inter = max(inter, routed + arch.shared_expert_intermediate_size)
    h = arch.hidden_size
    q_out = arch.q_dim * (2 if arch.attn_output_gate else 1)
    width = 2 * h + q_out + 2 * arch.kv_dim + arch.q_dim + 3 * inter + max(h, inter)
    return FP16 * batch * chunk * width + 4 * batch * arch.vocab_size


@dataclass(frozen=True)
class MemorySettings:
    """Everything besides the lattice configs that decides GPU bytes; defaults are stated."""

    ctx: int = DEFAULT_CTX
    batch: int = DEFAULT_BATCH
    kv_bits: int = DEFAULT_KV_BITS
    embed: str = DEFAULT_EMBED
    lm_head: str = DEFAULT_LM_HEAD
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT
    workspace_bytes: int = DEFAULT_WORKSPACE
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    overhead_bytes: int | None = None  # replaces context + workspace + activations when set

    def __post_init__(self) -> None:
        for name in ("ctx", "batch", "prefill_chunk"):
            value = getattr(self, name)
            if value < 1:
                raise BadInputError(f"--{name.replace('_', '-')} {value} must be at least 1")
        if self.kv_bits not in KV_BITS:
            raise BadInputError(
                f"--kv-bits {self.kv_bits} is not supported: use one of "
                f"{', '.join(map(str, KV_BITS))}"
            )
        if self.embed not in PRECISIONS:
            raise BadInputError(
                f"--embed '{self.embed}' is unknown: use one of {', '.join(PRECISIONS)}"
            )
        if self.lm_head not in LM_HEAD_CHOICES:
            raise BadInputError(
                f"--lm-head '{self.lm_head}' is unknown: use one of {', '.join(LM_HEAD_CHOICES)}"
            )
        for name in ("cuda_context_bytes", "workspace_bytes", "overhead_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise BadInputError(f"{name} {value} must not be negative")


ConfigFor = Callable[[LinearSpec], LatticeConfig]


def quantized_bytes(arch: Architecture, config_for: ConfigFor) -> dict[str, int]:
    """Packed bytes of every quantized linear: codes, scales, whitening and lattice matrices."""
    parts = {"codes": 0, "scales": 0, "whitening": 0}
    used: set[LatticeConfig] = set()
    for spec in linears(arch):
        cfg = config_for(spec)
        used.add(cfg)
        for key, value in packed_linear_bytes(spec.out_features, spec.in_features, cfg).items():
            parts[key] += value * spec.count
    parts["lattice_matrices"] = sum(lattice_matrix_bytes(cfg) for cfg in used)
    return parts


def embedding_layout(arch: Architecture, settings: MemorySettings) -> EmbeddingLayout:
    """How `liftq pack` with the settings' --embed / --lm-head stores this model's matrices."""
    return EmbeddingLayout(settings.embed, settings.lm_head, tied=arch.tie_embeddings)


def embedding_bytes(arch: Architecture, settings: MemorySettings) -> tuple[int, int, int]:
    """(embed GPU bytes, lm_head GPU bytes, host bytes) for the settings' precisions.

    The packed file's bytes of each part (`io.embedding_format.embedding_bytes`), with a
    `host` embedding moved from the GPU to host RAM. A tied pair at one precision is stored
    once, under the embedding (lm_head 0); tied at different precisions, both are stored.
    """
    stored = stored_embedding_bytes(
        arch.vocab_size, arch.hidden_size, embedding_layout(arch, settings)
    )
    host = stored["embed"] if settings.embed == "host" else 0
    return stored["embed"] - host, stored["lm_head"], host


def fixed_bytes(arch: Architecture, settings: MemorySettings) -> dict[str, int]:
    """GPU bytes that do not depend on the lattice configs, by part."""
    embed, lm_head, _ = embedding_bytes(arch, settings)
    parts = {
        "embed": embed,
        "lm_head": lm_head,
        "norms_biases": FP16 * _other_params(arch),
        "kv_cache": kv_cache_bytes(arch, settings.ctx, settings.batch, settings.kv_bits),
    }
    if arch.linear_attention is not None:
        parts["linear_state"] = linear_state_bytes(arch, settings.batch)
    if settings.overhead_bytes is not None:
        parts["overhead"] = settings.overhead_bytes
    else:
        parts["cuda_context"] = settings.cuda_context_bytes
        parts["workspace"] = settings.workspace_bytes
        parts["activations"] = activation_bytes(
            arch, min(settings.prefill_chunk, settings.ctx), settings.batch
        )
    return parts


@dataclass(frozen=True)
class Breakdown:
    """GPU bytes by part (`parts`, insertion-ordered), plus bytes kept in host memory."""

    parts: dict[str, int] = field(default_factory=dict)
    host_bytes: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def weights(self) -> int:
        """Bytes of the quantized linears (codes, scales, whitening, lattice matrices)."""
        return sum(self.parts[k] for k in ("codes", "scales", "whitening", "lattice_matrices"))


def model_breakdown(
    arch: Architecture, config_for: ConfigFor, settings: MemorySettings
) -> Breakdown:
    """Full GPU memory of `arch` with each linear at `config_for(spec)` under `settings`."""
    _, _, host = embedding_bytes(arch, settings)
    parts = {**quantized_bytes(arch, config_for), **fixed_bytes(arch, settings)}
    return Breakdown(parts=parts, host_bytes=host)


def uniform(cfg: LatticeConfig) -> ConfigFor:
    """A `ConfigFor` that puts every linear at `cfg`."""
    return lambda spec: cfg


def settings_assumptions(settings: MemorySettings) -> dict[str, object]:
    """The settings as plain values, for reports and --json `assumptions`."""
    values: dict[str, object] = {
        "ctx": settings.ctx,
        "batch": settings.batch,
        "kv_bits": settings.kv_bits,
        "embed": settings.embed,
        "lm_head": settings.lm_head,
    }
    if settings.overhead_bytes is not None:
        values["overhead_bytes"] = settings.overhead_bytes
    else:
        values["cuda_context_bytes"] = settings.cuda_context_bytes
        values["workspace_bytes"] = settings.workspace_bytes
        values["prefill_chunk"] = settings.prefill_chunk
    return values
