"""Write and read packed LiftQuant checkpoints (`liftq pack`), format in `io.packed_format`.

`pack_quantized` turns the folder `liftq quantize` writes (fp32 fake-quant weights plus
`liftq_codes.safetensors`) into a Hugging Face folder whose `model.safetensors` holds, for every
quantized linear, the bit-packed sign codes, fp16 row scales and fp16 whitening factors, each
used lattice matrix once (float32), and every other tensor (embeddings, norms, biases) at
`dtype`.
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
from safetensors import SafetensorError, safe_open

from liftq_cli import __version__
from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_dir
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
from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME, TensorSpec, write_streaming
from liftq_cli.quant.configs import LatticeConfig
from liftq_kernels.reference import pack_bits, unpack_bits

CODES_FILE = "liftq_codes.safetensors"
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
PACK_ROWS = 4096  # rows bit-packed at a time (bounds the int64 scratch of pack_bits)
SOURCE_TENSORS = ("codes", "scale", "s1", "p1", "p2", "s2")  # per linear in liftq_codes
TORCH_DTYPES = {"int32": torch.int32, "float16": torch.float16, "float32": torch.float32}
PARTS = ("codes", "scales", "whitening", "lattice_matrices", "unquantized", "header")


@dataclass
class PackReport:
    """What `pack_quantized` wrote: bytes by part (read back from the file) and the formula."""

    out: Path
    parts: dict[str, int]  # PARTS -> bytes in model.safetensors (sums to its size)
    formula: dict[str, int]  # codes, scales, whitening, lattice_matrices from the closed formula
    files: dict[str, int]  # file name -> bytes
    bits: BitsReport
    configs: dict[str, int] = field(default_factory=dict)  # config name -> linears

    def as_json(self) -> dict[str, Any]:
        quantized = sum(self.parts[k] for k in self.formula)
        return {
            "out": str(self.out),
            "format_version": FORMAT_VERSION,
            "bytes": dict(self.parts),
            "formula_bytes": dict(self.formula),
            "quantized_bytes": quantized,
            "formula_quantized_bytes": sum(self.formula.values()),
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


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise BadInputError(
            f"'{folder}' has no {name}: pass the folder `liftq quantize --out` wrote"
        )
    return path


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
    state: dict[str, torch.Tensor], prefix: str, cfg: LatticeConfig
) -> dict[str, torch.Tensor]:
    """The packed tensors of one linear from its quantizer state (`QuantizedLinear.state`).

    state[prefix + "codes"]: bool [out, ceil(in/d), D]; "scale": float32 [out]; "s1", "s2":
    [in]; "p1": [a, a]; "p2": [b, b]. Returns {name within the module: tensor} matching
    `linear_tensors` exactly (int32 words, fp16 everything else).
    """
    missing = [n for n in SOURCE_TENSORS if f"{prefix}{n}" not in state]
    if missing:
        raise BadInputError(f"{prefix}{missing[0]} is missing: re-run `liftq quantize`")
    codes = state[f"{prefix}codes"]
    in_features = state[f"{prefix}s1"].numel()
    out_features = codes.shape[0]
    specs = linear_tensors(out_features, in_features, cfg)
    k = code_bits(in_features, cfg)
    if codes.dim() != 3 or codes.shape[1] * codes.shape[2] != k or codes.shape[2] != cfg.D:
        raise BadInputError(
            f"{prefix}codes has shape {tuple(codes.shape)}, {cfg.name} with in_features "
            f"{in_features} needs ({out_features}, {k // cfg.D}, {cfg.D}): re-run quantize"
        )
    flat = codes.reshape(out_features, k).bool()
    words = torch.cat([pack_bits(chunk) for chunk in flat.split(PACK_ROWS)])
    packed = {"qweight": words, "qscale": _fp16(state[f"{prefix}scale"], f"{prefix}scale")}
    for name in ("s1", "p1", "p2", "s2"):
        packed[name] = _fp16(state[f"{prefix}{name}"], f"{prefix}{name}")
    for name, spec in specs.items():
        if tuple(packed[name].shape) != spec.shape:
            raise BadInputError(
                f"{prefix}{name} has shape {tuple(packed[name].shape)}, the format needs "
                f"{spec.shape}: the quantized checkpoint is inconsistent; re-run quantize"
            )
    return packed


def read_quant_meta(quant_dir: Path) -> tuple[dict[str, Any], dict[str, LatticeConfig]]:
    """liftq.json of a quantized folder and its {linear name: config}."""
    meta_path = _require(quant_dir, META_FILE)
    meta = _read_json(meta_path)
    try:
        layers = {key: LatticeConfig.parse(name) for key, name in meta["layers"].items()}
    except (KeyError, AttributeError, TypeError) as exc:
        raise BadInputError(
            f"'{meta_path}' is not a liftq quantize manifest ({exc}): re-run `liftq quantize`"
        ) from exc
    if not layers:
        raise BadInputError(f"'{meta_path}' lists no quantized layers: re-run `liftq quantize`")
    return meta, layers


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
            part = "unquantized"
        parts[part] += end - start
    return parts


def _open(path: Path) -> Any:
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise BadInputError(f"'{path}' is corrupt ({exc}): re-run `liftq quantize`") from exc


def _linear_shapes(
    codes: Any, codes_path: Path, layers: dict[str, LatticeConfig]
) -> dict[str, tuple[int, int, LatticeConfig]]:
    """(out_features, in_features, cfg) of every linear, from the codes file's header."""
    names = set(codes.keys())
    shapes = {}
    for key, cfg in layers.items():
        missing = [n for n in (*SOURCE_TENSORS, "lattice") if f"{key}.{n}" not in names]
        if "lattice" in missing and f"lattice.{cfg.name}" in names:
            missing.remove("lattice")
        if missing:
            name = f"lattice.{cfg.name}" if missing[0] == "lattice" else f"{key}.{missing[0]}"
            raise BadInputError(
                f"'{codes_path}' lacks {name}: the quantized folder is incomplete; "
                f"re-run `liftq quantize`"
            )
        shape = codes.get_slice(f"{key}.codes").get_shape()
        in_features = codes.get_slice(f"{key}.s1").get_shape()[0]
        shapes[key] = (shape[0], in_features, cfg)
    return shapes


def _layout(
    shapes: dict[str, tuple[int, int, LatticeConfig]], weights: Any, dtype: str
) -> list[TensorSpec]:
    """Every tensor of the packed file in order: linears (`linear_tensors`), lattice matrices,
    then the fake-quant weights that are not a quantized linear's `weight`, at `dtype`."""
    specs = []
    for key, (out_f, in_f, cfg) in shapes.items():
        for name, spec in linear_tensors(out_f, in_f, cfg).items():
            specs.append(TensorSpec(f"{key}.{name}", TORCH_DTYPES[spec.dtype], spec.shape))
    for cfg in sorted({cfg for _, _, cfg in shapes.values()}):
        spec = lattice_tensor(cfg)
        specs.append(TensorSpec(lattice_key(cfg), TORCH_DTYPES[spec.dtype], spec.shape))
    quantized = {f"{key}.weight" for key in shapes}
    stored_names = list(weights.keys())  # a safetensors handle is not iterable
    absent = sorted(quantized - set(stored_names))
    if absent:
        raise BadInputError(f"the fake-quant weights lack {absent[0]}: re-run `liftq quantize`")
    for name in stored_names:
        if name not in quantized:
            piece = weights.get_slice(name)
            stored = DTYPES_BY_NAME[piece.get_dtype()]
            target = OTHER_DTYPES[dtype] if stored.is_floating_point else stored
            specs.append(TensorSpec(name, target, tuple(piece.get_shape())))
    return specs


def _producer(codes: Any, weights: Any, shapes: dict[str, tuple[int, int, LatticeConfig]]):
    """`produce(spec)` for `write_streaming`: packs one linear at a time (kept until done)."""
    current: dict[str, dict[str, torch.Tensor]] = {}

    def produce(spec: TensorSpec) -> torch.Tensor:
        module, _, leaf = spec.name.rpartition(".")
        if module in shapes and leaf in LINEAR_PARTS:
            if module not in current:
                current.clear()
                state = {f"{module}.{n}": codes.get_tensor(f"{module}.{n}") for n in SOURCE_TENSORS}
                current[module] = pack_linear(state, f"{module}.", shapes[module][2])
            return current[module][leaf]
        if module == LATTICE_MODULE:
            cfg = next(c for _, _, c in shapes.values() if lattice_key(c) == spec.name)
            matrix = codes.get_tensor(f"lattice.{cfg.name}")
            if tuple(matrix.shape) != spec.shape:
                raise BadInputError(
                    f"lattice.{cfg.name} has shape {tuple(matrix.shape)}, expected "
                    f"{spec.shape}: re-run `liftq quantize`"
                )
            return matrix.to(spec.dtype).contiguous()
        return weights.get_tensor(spec.name).to(spec.dtype).contiguous()

    return produce


def _formula(shapes: dict[str, tuple[int, int, LatticeConfig]]) -> dict[str, int]:
    parts = {"codes": 0, "scales": 0, "whitening": 0}
    for out_f, in_f, cfg in shapes.values():
        for part, value in packed_linear_bytes(out_f, in_f, cfg).items():
            parts[part] += value
    used = {cfg for _, _, cfg in shapes.values()}
    parts["lattice_matrices"] = sum(lattice_matrix_bytes(cfg) for cfg in used)
    return parts


def pack_quantized(quant_dir: Path, out: Path, dtype: str = "float16") -> PackReport:
    """Pack the `liftq quantize` output `quant_dir` into `out` (atomic); see the module doc.

    Streams: the header comes from the format table, then one linear is packed at a time, so
    memory holds one linear's codes and the largest other tensor, not the model.
    """
    quant_dir, out = Path(quant_dir), Path(out)
    if dtype not in OTHER_DTYPES:
        raise BadInputError(f"--dtype '{dtype}' is unknown: use {', '.join(OTHER_DTYPES)}")
    if not quant_dir.is_dir():
        raise BadInputError(f"'{quant_dir}' is not a folder: pass `liftq quantize --out`'s folder")
    if out.resolve() == quant_dir.resolve() or quant_dir.resolve() in out.resolve().parents:
        raise BadInputError(f"--out '{out}' is inside QUANT_DIR: choose a folder outside it")
    config = _read_json(_require(quant_dir, "config.json"))
    codes_path = _require(quant_dir, CODES_FILE)
    weights_path = _require(quant_dir, WEIGHTS_FILE)
    meta, layers = read_quant_meta(quant_dir)
    codes, weights = _open(codes_path), _open(weights_path)
    shapes = _linear_shapes(codes, codes_path, layers)
    specs = _layout(shapes, weights, dtype)
    config["quantization_config"] = quantization_config(layers)
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
        write_streaming(tmp / WEIGHTS_FILE, specs, _producer(codes, weights, shapes), metadata)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    configs: dict[str, int] = {}
    for cfg in layers.values():
        configs[cfg.name] = configs.get(cfg.name, 0) + 1
    return PackReport(
        out=out,
        parts=safetensors_parts(out / WEIGHTS_FILE, set(layers)),
        formula=_formula(shapes),
        files={p.name: p.stat().st_size for p in sorted(out.iterdir())},
        bits=bits_report(shapes),
        configs=configs,
    )


def read_packed_config(packed_dir: Path) -> dict[str, LatticeConfig]:
    """{linear name: config} of a packed folder (validates method and format version)."""
    config = _read_json(_require(Path(packed_dir), "config.json"))
    if "quantization_config" not in config:
        raise BadInputError(f"'{packed_dir}' is not a packed LiftQuant model: run `liftq pack`")
    return parse_quantization_config(config["quantization_config"], f"'{packed_dir}'")


def unpack_codes(packed_dir: Path) -> dict[str, torch.Tensor]:
    """Every linear's sign codes back as bool [out, ceil(in/d), D] (True = +1)."""
    layers = read_packed_config(packed_dir)
    codes: dict[str, torch.Tensor] = {}
    with safe_open(Path(packed_dir) / WEIGHTS_FILE, framework="pt") as handle:
        for key, cfg in layers.items():
            words = handle.get_tensor(f"{key}.qweight")
            in_features = handle.get_slice(f"{key}.s1").get_shape()[0]
            bits = unpack_bits(words, code_bits(in_features, cfg))
            codes[key] = bits.view(words.shape[0], -1, cfg.D)
    return codes
