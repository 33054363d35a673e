"""The packed LiftQuant format, version 2: tensor names, shapes, dtypes and their byte count.

This module is the single source of the layout (docs/FORMAT.md describes it for readers):
`liftq pack` writes exactly the tensors `linear_tensors` lists, the runtime allocates them
from the same table, and `packed_linear_bytes` (used by `liftq plan`) is the closed-form
sum of their sizes. Pure Python: no torch, no disk.

One quantized linear (out_features o, in_features i, lattice LQ-D/d), tensors under the
linear's module prefix (e.g. `model.layers.0.self_attn.q_proj.`):

    qweight  int32 [o, W]        W = ceil(ceil(i/d) * D / 32), rounded up to a multiple of 4
                                 when >= 256 (16-byte rows; `liftq_kernels.reference
                                 .padded_words`): sign bits, 1 = +1, in the interleaved code
                                 layout of
                                 `liftq_kernels.reference.pack_interleaved` (rows 16-byte aligned)
    qscale   fp16  [o]           row scales s
    s1, s2   fp16  [i]           whitening scales
    p1, p2   fp16  [a, a], [b, b] orthogonal Kronecker factors, a * b = i; a factor whose
                                 size is a power of two is a signed Hadamard matrix (the
                                 default fixed rotations) and is stored as its row signs instead:
    p1_signs, p2_signs int8 [a], [b]  P = diag(signs) H / sqrt(size), H Sylvester's Hadamard
                                 A model quantized with trained rotations (`--whiten-rotations
                                 trained`) stores every factor dense (p1, p2) and says so in
                                 `quantization_config.rotations: trained` (absent: fixed).
    bias     (only if the source linear has one; counted with the unquantized tensors)

Format 1 (still read: `linear_tensors(..., version=1)`) had unpadded rows in the plain
bitstream order of `pack_bits` and dense p1, p2 always.

Each lattice matrix M (float32 [d, D]) used by the model is stored once as
`liftq_lattice.D{D}_d{d}`: it costs a few hundred bytes, and its rounding error would be shared
by every weight of the model (in fp16 it was the largest of the fp16 roundings).
`config.json` carries `quantization_config` (see `quantization_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig, LatticeConfigError
from liftq_kernels.reference import padded_words

FORMAT_VERSION = 2
ROTATIONS = ("fixed", "trained")  # quantization_config.rotations (whiten_rotations)
READ_VERSIONS = (1, 2)
QUANT_METHOD = "liftquant"
WEIGHTS_FILE = "model.safetensors"
LATTICE_MODULE = "liftq_lattice"
WORD_BITS = 32
FP16 = 2
DTYPE_BYTES = {"int32": 4, "float16": 2, "float32": 4, "int8": 1}
LINEAR_PARTS = {
    "qweight": "codes",
    "qscale": "scales",
    "s1": "whitening",
    "p1": "whitening",
    "p2": "whitening",
    "p1_signs": "whitening",
    "p2_signs": "whitening",
    "s2": "whitening",
}
"""Tensor name within a linear -> the byte-report part it belongs to."""


def whitening_factors(in_features: int) -> tuple[int, int]:
    """(p1, p2): p1 * p2 = in_features, p1 <= p2, the divisor pair closest to sqrt(in_features).

    The same pair as `quant.whitening.kron_factors`: 4096 -> (64, 64), 1536 -> (32, 48),
    11008 -> (86, 128).
    """
    if in_features < 1:
        raise BadInputError(f"in_features={in_features} must be positive")
    p1 = math.isqrt(in_features)
    while in_features % p1:
        p1 -= 1
    return p1, in_features // p1


def code_bits(in_features: int, cfg: LatticeConfig) -> int:
    """Sign bits of one row: ceil(in_features / d) slices of D bits."""
    return -(-in_features // cfg.d) * cfg.D


def words_per_row(in_features: int, cfg: LatticeConfig, version: int = FORMAT_VERSION) -> int:
    """32-bit words of one row of `qweight` (format 2: long rows padded to 16 bytes)."""
    if version == 1:
        return -(-code_bits(in_features, cfg) // WORD_BITS)
    return padded_words(code_bits(in_features, cfg))


def is_hadamard_size(size: int) -> bool:
    """True when a Kronecker factor of this size is stored as signs (a power of two)."""
    return size & (size - 1) == 0


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor."""

    shape: tuple[int, ...]
    dtype: str  # "int32", "float16" or "float32"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def _factor(name: str, size: int, version: int, dense: bool) -> tuple[str, TensorSpec]:
    if version >= 2 and is_hadamard_size(size) and not dense:
        return f"{name}_signs", TensorSpec((size,), "int8")
    return name, TensorSpec((size, size), "float16")


def linear_tensors(
    out_features: int,
    in_features: int,
    cfg: LatticeConfig,
    version: int = FORMAT_VERSION,
    dense_factors: bool = False,
) -> dict[str, TensorSpec]:
    """The tensors of one packed linear (names within the module), in file order.

    dense_factors: P1, P2 stored dense whatever their size (a model with trained rotations,
    `trained_rotations`)."""
    a, b = whitening_factors(in_features)
    words = words_per_row(in_features, cfg, version)
    return dict(
        [
            ("qweight", TensorSpec((out_features, words), "int32")),
            ("qscale", TensorSpec((out_features,), "float16")),
            ("s1", TensorSpec((in_features,), "float16")),
            _factor("p1", a, version, dense_factors),
            _factor("p2", b, version, dense_factors),
            ("s2", TensorSpec((in_features,), "float16")),
        ]
    )


def lattice_key(cfg: LatticeConfig) -> str:
    """Tensor name of the lattice matrix of `cfg`, e.g. `liftq_lattice.D24_d10`."""
    return f"{LATTICE_MODULE}.{lattice_buffer(cfg)}"


def lattice_buffer(cfg: LatticeConfig) -> str:
    return f"D{cfg.D}_d{cfg.d}"


def lattice_tensor(cfg: LatticeConfig) -> TensorSpec:
    return TensorSpec((cfg.d, cfg.D), "float32")


def packed_linear_bytes(
    out_features: int, in_features: int, cfg: LatticeConfig, dense_factors: bool = False
) -> dict[str, int]:
    """Bytes of one packed linear by part: {"codes", "scales", "whitening"}.

    codes = 4 o W (W = ceil(ceil(i/d) * D / 32), rounded up to a multiple of 4 from 256 on),
    scales = 2 o,
    whitening = 4 i + f(a) + f(b) with f(p) = p (int8 signs) for a power of two, else 2 p^2
    (always 2 p^2 with dense_factors: trained rotations).
    The lattice matrix is shared by all linears of a config: add `lattice_matrix_bytes` once.
    """
    parts = {"codes": 0, "scales": 0, "whitening": 0}
    specs = linear_tensors(out_features, in_features, cfg, dense_factors=dense_factors)
    for name, spec in specs.items():
        parts[LINEAR_PARTS[name]] += spec.nbytes
    return parts


def lattice_matrix_bytes(cfg: LatticeConfig) -> int:
    """Bytes of the float32 lattice matrix M (d x D), stored once per model per config."""
    return lattice_tensor(cfg).nbytes


def quantization_config(
    layers: Mapping[str, LatticeConfig],
    embeddings: Mapping[str, Any] | None = None,
    rotations: str = "fixed",
) -> dict[str, Any]:
    """The `config.json` entry: method, format version, the config of every linear, `rotations:
    trained` when the whitening factors were trained (stored dense), and, when given, how the
    embedding and lm_head are stored (`EmbeddingLayout.as_config()` of `io.embedding_format`)."""
    used = sorted(set(layers.values()))
    config = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "layers": {key: cfg.name for key, cfg in sorted(layers.items())},
        "lattices": {cfg.name: lattice_key(cfg) for cfg in used},
    }
    if rotations != "fixed":  # only then, so fixed models read as before the key existed
        config["rotations"] = rotations
    if embeddings is not None:
        config.update(embeddings)
    return config


def trained_rotations(config: Mapping[str, Any], where: str) -> bool:
    """True when `quantization_config` says the whitening factors are trained (stored dense)."""
    rotations = config.get("rotations", "fixed")
    if rotations not in ROTATIONS:
        raise BadInputError(
            f"{where}: quantization_config.rotations {rotations!r} is unknown (liftq writes "
            f"{' or '.join(ROTATIONS)}): re-pack the model with `liftq pack`"
        )
    return rotations == "trained"


def parse_quantization_config(config: Mapping[str, Any], where: str) -> dict[str, LatticeConfig]:
    """Validate a `quantization_config` and return {linear module name: LatticeConfig}."""
    method = config.get("quant_method")
    if method != QUANT_METHOD:
        raise BadInputError(f"{where}: quant_method is {method!r}, expected '{QUANT_METHOD}'")
    version = config.get("format_version")
    if version not in READ_VERSIONS:
        raise BadInputError(
            f"{where}: packed format version {version!r} is not supported by this liftq "
            f"(reads versions {', '.join(map(str, READ_VERSIONS))}): re-pack with `liftq pack` "
            f"or upgrade liftq"
        )
    layers = config.get("layers")
    if not isinstance(layers, Mapping) or not layers:
        raise BadInputError(f"{where}: quantization_config.layers is missing: re-pack the model")
    from liftq_cli.io.embedding_format import parse_embeddings

    parse_embeddings(config, where)  # validated here too: every reader refuses a bad entry
    trained_rotations(config, where)
    try:
        return {str(key): LatticeConfig.parse(str(name)) for key, name in layers.items()}
    except LatticeConfigError as exc:
        raise BadInputError(f"{where}: {exc}: re-pack the model") from None


@dataclass(frozen=True)
class BitsReport:
    """Effective bits per weight of the quantized linears = nominal D/d + overhead."""

    weights: int  # quantized weights (sum of o * i)
    nominal_bits: float  # weight-averaged D/d
    overhead_bits: dict[str, float]  # per weight: padding, scales, whitening, lattice_matrices

    @property
    def effective_bits(self) -> float:
        return self.nominal_bits + sum(self.overhead_bits.values())


def bits_report(
    shapes: Mapping[str, tuple[int, int, LatticeConfig]], dense_factors: bool = False
) -> BitsReport:
    """Bits per weight of linears {name: (out, in, cfg)} stored in this format (dense_factors:
    with trained rotations).

    padding counts the code bits beyond o * i * D/d (slice and word rounding of each row).
    """
    weights = sum(o * i for o, i, _ in shapes.values())
    nominal = sum(o * i * cfg.D / cfg.d for o, i, cfg in shapes.values())
    parts = {"codes": 0, "scales": 0, "whitening": 0}
    for o, i, cfg in shapes.values():
        for key, value in packed_linear_bytes(o, i, cfg, dense_factors).items():
            parts[key] += value
    lattices = sum(lattice_matrix_bytes(cfg) for cfg in {cfg for _, _, cfg in shapes.values()})
    per = 1 / max(weights, 1)
    overhead = {
        "padding": (8 * parts["codes"] - nominal) * per,
        "scales": 8 * parts["scales"] * per,
        "whitening": 8 * parts["whitening"] * per,
        "lattice_matrices": 8 * lattices * per,
    }
    return BitsReport(weights=weights, nominal_bits=nominal * per, overhead_bits=overhead)
