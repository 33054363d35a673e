"""Write and read packed LiftQuant checkpoints (`liftq pack`), format in `io.packed_format`.

`pack_quantized` turns the folder `liftq quantize` writes (io/quantized.py: bit-packed codes,
float32 scales and whitening factors, the unquantized tensors) into a Hugging Face folder
whose `model.safetensors` holds, for every quantized linear, the bit-packed sign codes, fp16
row scales and fp16 whitening factors, each used lattice matrix once (float32), the token
embedding and lm_head at `embed` / `lm_head` (io/packed_embeddings.py), and every other
tensor (norms, biases) at `dtype`.
`config.json` gains the `quantization_config` that makes `from_pretrained` build
`LiftQuantLinear` layers. The output is written atomically.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_dir
from liftq_cli.io.codes import pack_codes
from liftq_cli.io.embedding_format import DEFAULT_EMBED, DEFAULT_LM_HEAD, EmbeddingLayout
from liftq_cli.io.outputs import check_output
from liftq_cli.io.packed_embeddings import (
    EMBED_SOURCE,
    LM_HEAD_SOURCE,
    EmbeddingPack,
    embedding_pack,
    matrix_part,
)
from liftq_cli.io.packed_format import (
    FORMAT_VERSION,
    LATTICE_MODULE,
    LINEAR_PARTS,
    WEIGHTS_FILE,
    BitsReport,
    bits_report,
    code_bits,
    lattice_key,
    lattice_matrix_bytes,
    lattice_tensor,
    linear_tensors,
    packed_linear_bytes,
    parse_quantization_config,
    quantization_config,
)
from liftq_cli.io.quantized import QuantizedFolder, read_quantized, require
from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME, TensorSpec, write_streaming
from liftq_cli.io.workdir import LINEAR_STATE
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.version import __version__
from liftq_kernels.reference import hadamard_signs, interleave_words, plain_words, unpack_bits

META_FILE = "liftq.json"
COPIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)
OTHER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SOURCE_TENSORS = LINEAR_STATE  # per linear in the quantize output (bool codes in memory)
TORCH_DTYPES = {
    "int32": torch.int32,
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
"""dtype name of a format table (`packed_format`, `embedding_format`) -> torch dtype."""
PARTS = ("codes", "scales", "whitening", "lattice_matrices")  # the linears' closed formula
PARTS += ("embed", "lm_head", "unquantized", "header")  # report order; sums to the file


@dataclass
class PackReport:
    """What `pack_quantized` wrote: bytes by part (read back from the file) and the formula."""

    out: Path
    parts: dict[str, int]  # PARTS -> bytes in model.safetensors (sums to its size)
    formula: dict[str, int]  # codes, scales, whitening, lattice_matrices from the closed formula
    files: dict[str, int]  # file name -> bytes
    bits: BitsReport
    configs: dict[str, int] = field(default_factory=dict)  # config name -> linears
    embeddings: EmbeddingLayout | None = None  # None: copied as they were (see embedding_pack)
    embedding_formula: dict[str, int] = field(default_factory=dict)  # embed, lm_head

    def as_json(self) -> dict[str, Any]:
        quantized = sum(self.parts[k] for k in self.formula)
        return {
            "out": str(self.out),
            "format_version": FORMAT_VERSION,
            "bytes": dict(self.parts),
            "formula_bytes": {**self.formula, **self.embedding_formula},
            "quantized_bytes": quantized,
            "formula_quantized_bytes": sum(self.formula.values()),
            "embeddings": self.embeddings.as_config() if self.embeddings else None,
            "files": dict(self.files),
            "total_bytes": sum(self.files.values()),
            "linears": sum(self.configs.values()),
            "configs": dict(self.configs),
            "quantized_weights": self.bits.weights,
            "bits_per_weight": {
                "nominal": self.bits.nominal_bits,
                "overhead": dict(self.bits.overhead_bits),
                "effective": self.bits.effective_bits,
            },
        }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read '{path}' ({exc}): re-run `liftq quantize`") from exc


def _fp16(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Cast to fp16, refusing overflow or a rounding error above 1e-3 of the tensor's norm.

    (Entries far below the tensor's scale, e.g. the ~1e-17 zeros of a DCT, may flush to zero.)
    """
    half = tensor.to(torch.float16)
    err = float((half.float() - tensor.float()).norm())
    if not torch.isfinite(half).all() or err > 1e-3 * float(tensor.float().norm()):
        big = float(tensor.abs().max())
        raise BadInputError(
            f"{name} does not fit float16 (max |x| = {big:.3g}, relative rounding error "
            f"{err / max(float(tensor.float().norm()), 1e-30):.2g}): the quantized checkpoint "
            f"is corrupt; re-run `liftq quantize`"
        )
    return half.contiguous()


def pack_linear(
    state: dict[str, torch.Tensor], prefix: str, cfg: LatticeConfig, dense_factors: bool = False
) -> dict[str, torch.Tensor]:
    """The packed tensors of one linear from its quantizer state (`QuantizedLinear.state`).

    state[prefix + "codes"]: bool [out, ceil(in/d), D]; "scale": float32 [out]; "s1", "s2":
    [in]; "p1": [a, a]; "p2": [b, b]. Returns {name within the module: tensor} matching
    `linear_tensors` exactly (int32 words in the interleaved format-2 order, int8 signs of
    the Hadamard factors, fp16 everything else; dense_factors: fp16 factors whatever their
    size, for trained rotations).
    """
    missing = [n for n in SOURCE_TENSORS if f"{prefix}{n}" not in state]
    if missing:
        raise BadInputError(f"{prefix}{missing[0]} is missing: re-run `liftq quantize`")
    codes = state[f"{prefix}codes"]
    in_features = state[f"{prefix}s1"].numel()
    out_features = codes.shape[0]
    specs = linear_tensors(out_features, in_features, cfg, dense_factors=dense_factors)
    k = code_bits(in_features, cfg)
    if codes.dim() != 3 or codes.shape[1] * codes.shape[2] != k or codes.shape[2] != cfg.D:
        raise BadInputError(
            f"{prefix}codes has shape {tuple(codes.shape)}, {cfg.name} with in_features "
            f"{in_features} needs ({out_features}, {k // cfg.D}, {cfg.D}): re-run quantize"
        )
    words = interleave_words(pack_codes(codes.bool()))
    packed = {"qweight": words, "qscale": _fp16(state[f"{prefix}scale"], f"{prefix}scale")}
    for name in ("s1", "p1", "p2", "s2"):
        if f"{name}_signs" in specs:
            signs = hadamard_signs(state[f"{prefix}{name}"])
            if signs is None:
                raise BadInputError(
                    f"{prefix}{name} is not a signed Hadamard matrix, which liftq's whitening "
                    f"always makes for a power-of-two size: the quantized checkpoint is corrupt "
                    f"or not from liftq; re-run `liftq quantize`"
                )
            packed[f"{name}_signs"] = signs
        else:
            packed[name] = _fp16(state[f"{prefix}{name}"], f"{prefix}{name}")
    for name, spec in specs.items():
        if tuple(packed[name].shape) != spec.shape:
            raise BadInputError(
                f"{prefix}{name} has shape {tuple(packed[name].shape)}, the format needs "
                f"{spec.shape}: the quantized checkpoint is inconsistent; re-run quantize"
            )
    return packed


def safetensors_parts(path: Path, quantized: set[str]) -> dict[str, int]:
    """Bytes of `path` by part (PARTS), from its header; sums to the file size."""
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    parts = dict.fromkeys(PARTS, 0)
    parts["header"] = 8 + header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        module, _, leaf = name.rpartition(".")
        if module == LATTICE_MODULE:
            part = "lattice_matrices"
        elif module in quantized and leaf in LINEAR_PARTS:
            part = LINEAR_PARTS[leaf]
        else:
            part = matrix_part(name) or "unquantized"
        parts[part] += end - start
    return parts


def _layout(
    quantized: QuantizedFolder, dtype: str, matrices: EmbeddingPack | None, dense: bool
) -> list[TensorSpec]:
    """Every tensor of the packed file in order: linears (`linear_tensors`), lattice matrices,
    the embedding and lm_head (`matrices`), then the other unquantized tensors, floating-point
    ones at `dtype`."""
    specs = []
    for key, cfg in quantized.layers.items():
        out_f, in_f = quantized.shapes[key]
        for name, spec in linear_tensors(out_f, in_f, cfg, dense_factors=dense).items():
            specs.append(TensorSpec(f"{key}.{name}", TORCH_DTYPES[spec.dtype], spec.shape))
    for cfg in sorted(set(quantized.layers.values())):
        spec = lattice_tensor(cfg)
        specs.append(TensorSpec(lattice_key(cfg), TORCH_DTYPES[spec.dtype], spec.shape))
    names = set(quantized.unquantized_names())
    if matrices is not None:
        specs.extend(matrices.specs())
        names -= {EMBED_SOURCE, LM_HEAD_SOURCE}
    with safe_open(quantized.unquantized_file, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
            if name in names:
                piece = handle.get_slice(name)
                stored = DTYPES_BY_NAME[piece.get_dtype()]
                target = OTHER_DTYPES[dtype] if stored.is_floating_point else stored
                specs.append(TensorSpec(name, target, tuple(piece.get_shape())))
    return specs


def _producer(quantized: QuantizedFolder, embeddings: EmbeddingPack | None, dense: bool):
    """`produce(spec)` for `write_streaming`: packs one linear at a time (kept until done)."""
    current: dict[str, dict[str, torch.Tensor]] = {}
    matrices = quantized.matrices()

    def produce(spec: TensorSpec) -> torch.Tensor:
        module, _, leaf = spec.name.rpartition(".")
        if module in quantized.layers and leaf in LINEAR_PARTS:
            if module not in current:
                current.clear()
                state = {f"{module}.{n}": t for n, t in quantized.linear_state(module).items()}
                current[module] = pack_linear(
                    state, f"{module}.", quantized.layers[module], dense_factors=dense
                )
            return current[module][leaf]
        if module == LATTICE_MODULE:
            cfg = next(c for c in quantized.layers.values() if lattice_key(c) == spec.name)
            matrix = matrices[cfg.name]
            if tuple(matrix.shape) != spec.shape:
                raise BadInputError(
                    f"lattice.{cfg.name} has shape {tuple(matrix.shape)}, expected "
                    f"{spec.shape}: re-run `liftq quantize`"
                )
            return matrix.to(spec.dtype).contiguous()
        if embeddings is not None and matrix_part(spec.name) is not None:
            return embeddings.produce(spec.name)
        with safe_open(quantized.unquantized_file, framework="pt") as handle:
            return handle.get_tensor(spec.name).to(spec.dtype).contiguous()

    return produce


def _formula(shapes: dict[str, tuple[int, int, LatticeConfig]], dense: bool) -> dict[str, int]:
    """Bytes of codes, scales, whitening and lattice matrices from the closed formula."""
    parts = {"codes": 0, "scales": 0, "whitening": 0}
    for out_f, in_f, cfg in shapes.values():
        for part, value in packed_linear_bytes(out_f, in_f, cfg, dense).items():
            parts[part] += value
    used = {cfg for _, _, cfg in shapes.values()}
    parts["lattice_matrices"] = sum(lattice_matrix_bytes(cfg) for cfg in used)
    return parts


def pack_quantized(
    quant_dir: Path,
    out: Path,
    dtype: str = "float16",
    overwrite: bool = False,
    embed: str = DEFAULT_EMBED,
    lm_head: str = DEFAULT_LM_HEAD,
) -> PackReport:
    """Pack the `liftq quantize` output `quant_dir` into `out` (atomic); see the module doc.

    embed: fp16, int8, int4 or host; lm_head: fp16, int8 or int4 (io/embedding_format.py);
    the defaults are `liftq plan`'s.

    Streams: the header comes from the format table, then one linear is packed at a time, so
    memory holds one linear's codes and the largest other tensor, not the model.
    """
    quant_dir, out = Path(quant_dir), Path(out)
    if dtype not in OTHER_DTYPES:
        raise BadInputError(f"--dtype '{dtype}' is unknown: use {', '.join(OTHER_DTYPES)}")
    if not quant_dir.is_dir():
        raise BadInputError(f"'{quant_dir}' is not a folder: pass `liftq quantize --out`'s folder")
    EmbeddingLayout(embed, lm_head)  # a bad --embed / --lm-head fails before any reading
    check_output(out, "--out", "pack", [quant_dir], overwrite)
    config = _read_json(require(quant_dir, "config.json"))
    quantized = read_quantized(quant_dir)
    meta, layers = quantized.manifest, quantized.layers
    shapes = {key: (*quantized.shapes[key], cfg) for key, cfg in layers.items()}
    names = set(quantized.unquantized_names())
    matrices = embedding_pack(quantized.unquantized_file, names, embed, lm_head, dtype)
    # trained rotations (quantize --whiten-rotations trained) are no Hadamard matrices: dense
    rotations = str(meta.get("options", {}).get("whiten_rotations", "fixed"))
    dense = rotations == "trained"
    specs = _layout(quantized, dtype, matrices, dense)
    layout = matrices.layout if matrices is not None else None
    config["quantization_config"] = quantization_config(
        layers, layout.as_config() if layout is not None else None, rotations
    )
    if matrices is not None:
        matrices.update_config(config)
    info = {
        "liftq_version": __version__,
        "format_version": FORMAT_VERSION,
        "source": str(quant_dir.resolve()),
        "unquantized_dtype": dtype,
        "quantize": {k: v for k, v in meta.items() if k != "layers"},
    }
    metadata = {"format": "pt", "liftq_format": str(FORMAT_VERSION)}
    with atomic_dir(out) as tmp:
        for filename in COPIED:
            if (quant_dir / filename).is_file():
                shutil.copy2(quant_dir / filename, tmp / filename)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        write_streaming(tmp / WEIGHTS_FILE, specs, _producer(quantized, matrices, dense), metadata)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    configs: dict[str, int] = {}
    for cfg in layers.values():
        configs[cfg.name] = configs.get(cfg.name, 0) + 1
    return PackReport(
        out=out,
        parts=safetensors_parts(out / WEIGHTS_FILE, set(layers)),
        formula=_formula(shapes, dense),
        files={p.name: p.stat().st_size for p in sorted(out.iterdir())},
        bits=bits_report(shapes, dense),
        configs=configs,
        embeddings=layout,
        embedding_formula=matrices.formula() if matrices is not None else {},
    )


def read_packed_config(packed_dir: Path) -> dict[str, LatticeConfig]:
    """{linear name: config} of a packed folder (validates method and format version)."""
    config = _read_json(require(Path(packed_dir), "config.json"))
    if "quantization_config" not in config:
        raise BadInputError(f"'{packed_dir}' is not a packed LiftQuant model: run `liftq pack`")
    return parse_quantization_config(config["quantization_config"], f"'{packed_dir}'")


def packed_format_version(packed_dir: Path) -> int:
    """The format version of a packed folder (after `read_packed_config` validated it)."""
    config = _read_json(require(Path(packed_dir), "config.json"))
    return int(config["quantization_config"]["format_version"])


def unpack_codes(packed_dir: Path) -> dict[str, torch.Tensor]:
    """Every linear's sign codes back as bool [out, ceil(in/d), D] (True = +1), format 1 or 2."""
    layers = read_packed_config(packed_dir)
    version = packed_format_version(packed_dir)
    codes: dict[str, torch.Tensor] = {}
    with safe_open(Path(packed_dir) / WEIGHTS_FILE, framework="pt") as handle:
        for key, cfg in layers.items():
            words = handle.get_tensor(f"{key}.qweight")
            if version >= 2:
                words = plain_words(words)
            in_features = handle.get_slice(f"{key}.s1").get_shape()[0]
            bits = unpack_bits(words, code_bits(in_features, cfg))
            codes[key] = bits.view(words.shape[0], -1, cfg.D)
    return codes
