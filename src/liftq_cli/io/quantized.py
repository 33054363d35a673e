"""The folder `liftq quantize` writes (format 2), and its reader.

    config.json, tokenizer files     copied from the source model
    liftq_codes.safetensors          per quantized linear (checkpoint name, e.g.
                                     `model.layers.0.self_attn.q_proj.`): `codes` int32, one bit
                                     per code bit (io/codes.py), `scale`, `s1`, `p1`, `p2`, `s2`
                                     float32; each used lattice matrix once, `lattice.LQ-D/d`
    liftq_unquantized.safetensors    every other tensor of the source (embeddings, norms, biases,
                                     lm_head) at the source dtype; fine-tuned norms replace theirs
    liftq.json                       the manifest: format_version, the config of every linear
                                     (`layers`), calibration, settings, per-block reports
    recipe.yaml                      the recipe that reproduces the run (`liftq quantize --recipe`)

No dense copy of a quantized weight is stored: a linear costs D/d bits per weight plus its
float32 scales and whitening factors. `liftq pack` turns the folder into the deployable packed
format; `liftq eval` reconstructs the weights in memory (runtime/quantized.py). Format 1
(liftq 0.1: fp32 fake-quant `model.safetensors` plus bool codes) is still read.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_dir
from liftq_cli.io.codes import pack_codes, unpack_codes, words_per_row
from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME, TensorSpec, write_streaming
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import LINEAR_STATE, LinearState, WorkDir
from liftq_cli.lattice_config import LatticeConfig, LatticeConfigError
from liftq_cli.version import __version__

QUANT_FORMAT_VERSION = 2
READS = (1, 2)
META_FILE = "liftq.json"
CODES_FILE = "liftq_codes.safetensors"
UNQUANTIZED_FILE = "liftq_unquantized.safetensors"
RECIPE_FILE = "recipe.yaml"
V1_WEIGHTS_FILE = "model.safetensors"  # format 1: fake-quant weights of every tensor
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def _layer_of(name: str) -> int:
    match = LAYER.match(name)
    return int(match.group(1)) if match else -1


def _block_layout(work: WorkDir, layer: int) -> tuple[list[TensorSpec], dict[str, LatticeConfig]]:
    """Specs of a finished block's linears in the output (checkpoint names) and their configs,
    read from the block file's header."""
    specs, configs = [], {}
    with safe_open(work.block_file(layer), framework="pt") as handle:
        keys = sorted(handle.keys())
        for key in keys:
            if key.endswith(".lattice"):
                D, d = (int(v) for v in handle.get_tensor(key).tolist())
                configs[key[: -len(".lattice")]] = LatticeConfig(D, d)
        for key in keys:
            if key.endswith(".lattice"):
                continue
            name = f"model.layers.{layer}.{key}"
            piece = handle.get_slice(key)
            shape = tuple(piece.get_shape())
            if key.endswith(".codes") and piece.get_dtype() == "BOOL":  # a liftq 0.1 work dir
                specs.append(TensorSpec(name, torch.int32, (shape[0], words_per_row(*shape[1:]))))
                continue
            specs.append(TensorSpec(name, DTYPES_BY_NAME[piece.get_dtype()], shape))
    return specs, configs


def write_quantized(
    source: Path,
    work: WorkDir,
    out: Path,
    num_layers: int,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    manifest: dict[str, Any],
    recipe_text: str,
    tuned: dict[str, torch.Tensor] | None = None,
    reader: WeightReader | None = None,
) -> dict[str, int]:
    """Assemble `out` atomically from the source folder and the finished work dir; returns
    {file name: bytes}.

    tuned: tensors that model-level fine-tuning changed, by checkpoint name (a linear's
    `.scale`, `.s1`, `.s2` and norm weights); they replace the block-stage / source values.
    Streams: one block's codes and one source tensor in memory at a time.
    """
    tuned = tuned or {}
    # reader: the checkpoint under the quantized model's names (`blocks.checkpoint_reader`:
    # experts unfused); the plain files serve a model without experts
    reader = WeightReader(source) if reader is None else reader
    code_specs: list[TensorSpec] = []
    configs: dict[str, str] = {}
    used: dict[str, LatticeConfig] = {}
    for layer in range(num_layers):
        specs, layer_configs = _block_layout(work, layer)
        code_specs.extend(specs)
        for name, cfg in layer_configs.items():
            configs[f"model.layers.{layer}.{name}"] = cfg.name
            used[cfg.name] = cfg
    for name, cfg in sorted(used.items()):
        code_specs.append(TensorSpec(f"lattice.{name}", torch.float32, (cfg.d, cfg.D)))
    quantized_weights = {f"{name}.weight" for name in configs}
    lacking = sorted(quantized_weights - set(reader.names()))
    assert not lacking, f"the reader does not name quantized weight {lacking[0]}"
    names = sorted(set(reader.names()) - quantized_weights, key=lambda n: (_layer_of(n), n))
    rest_specs = [TensorSpec(n, reader.dtype(n), reader.shape(n)) for n in names]

    block_state: dict[int, dict[str, torch.Tensor]] = {}

    def produce_code(spec: TensorSpec) -> torch.Tensor:
        if spec.name.startswith("lattice."):
            return matrices(used[spec.name[len("lattice.") :]]).float().contiguous()
        if spec.name in tuned:
            return tuned[spec.name].float().contiguous()
        layer = _layer_of(spec.name)
        if layer not in block_state:
            block_state.clear()  # keep one block in memory
            block_state[layer] = {
                f"{name}.{part}": tensor
                for name, (_, state) in work.load_block(layer).items()
                for part, tensor in state.items()
            }
        local = spec.name[len(f"model.layers.{layer}.") :]
        tensor = block_state[layer][local]
        return pack_codes(tensor) if local.endswith(".codes") else tensor.contiguous()

    def produce_rest(spec: TensorSpec) -> torch.Tensor:
        if spec.name in tuned:
            return tuned[spec.name].to(spec.dtype).contiguous()
        return reader.get(spec.name).contiguous()

    info = dict(
        manifest, liftq_version=__version__, format_version=QUANT_FORMAT_VERSION, layers=configs
    )
    with atomic_dir(out) as tmp:
        for filename in COPIED:
            if (source / filename).is_file():
                shutil.copy2(source / filename, tmp / filename)
        write_streaming(tmp / CODES_FILE, code_specs, produce_code)
        write_streaming(tmp / UNQUANTIZED_FILE, rest_specs, produce_rest, {"format": "pt"})
        (tmp / RECIPE_FILE).write_text(recipe_text)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())}


def require(folder: Path, name: str) -> Path:
    """`folder/name`, or BadInputError saying to pass a `liftq quantize` output."""
    path = folder / name
    if not path.is_file():
        raise BadInputError(
            f"'{folder}' has no {name}: pass the folder `liftq quantize --out` wrote"
        )
    return path


@contextmanager
def _open(path: Path) -> Iterator[Any]:
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except SafetensorError as exc:
        raise BadInputError(f"'{path}' is corrupt ({exc}): re-run `liftq quantize`") from None


def is_quantized_folder(path: Path) -> bool:
    """True for a folder `liftq quantize` wrote (any format version)."""
    meta = Path(path) / META_FILE
    if not (Path(path).is_dir() and meta.is_file() and (Path(path) / CODES_FILE).is_file()):
        return False
    try:
        return "quantization_config" not in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class QuantizedFolder:
    """A validated `liftq quantize` output; tensors are read on demand."""

    path: Path
    manifest: dict[str, Any]
    layers: dict[str, LatticeConfig]  # checkpoint name of each quantized linear -> config
    shapes: dict[str, tuple[int, int]]  # -> (out_features, in_features)
    format_version: int

    @property
    def codes_file(self) -> Path:
        return self.path / CODES_FILE

    @property
    def unquantized_file(self) -> Path:
        return self.path / (UNQUANTIZED_FILE if self.format_version >= 2 else V1_WEIGHTS_FILE)

    def linear_state(self, name: str) -> LinearState:
        """One linear's codes (bool [out, slices, D]), scale, s1, p1, p2, s2 (float32)."""
        cfg = self.layers[name]
        with _open(self.codes_file) as handle:
            state = {part: handle.get_tensor(f"{name}.{part}") for part in LINEAR_STATE}
        if state["codes"].dtype != torch.bool:
            slices = -(-self.shapes[name][1] // cfg.d)
            state["codes"] = unpack_codes(state["codes"], slices, cfg.D, f"{name}.codes")
        return state

    def linear_states(self) -> dict[str, LinearState]:
        return {name: self.linear_state(name) for name in self.layers}

    def matrices(self) -> dict[str, torch.Tensor]:
        """{config name: lattice matrix float32 [d, D]} of every config used."""
        with _open(self.codes_file) as handle:
            return {
                cfg.name: handle.get_tensor(f"lattice.{cfg.name}")
                for cfg in sorted(set(self.layers.values()))
            }

    def unquantized_names(self) -> list[str]:
        quantized = {f"{name}.weight" for name in self.layers}
        with _open(self.unquantized_file) as handle:
            return [n for n in handle.keys() if n not in quantized]  # noqa: SIM118 (a handle is not iterable)

    def unquantized(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a quantized linear's weight, at its stored dtype."""
        names = self.unquantized_names()
        with _open(self.unquantized_file) as handle:
            return {name: handle.get_tensor(name) for name in names}


def read_quantized(path: Path) -> QuantizedFolder:
    """Open and validate a `liftq quantize` output folder (header reads only).

    Raises BadInputError naming the file for a missing, unreadable, corrupt or inconsistent
    part, and for a format version this liftq does not read."""
    path = Path(path)
    if not path.is_dir():
        raise BadInputError(f"'{path}' is not a folder: pass the folder `liftq quantize` wrote")
    meta_path = require(path, META_FILE)
    try:
        manifest = json.loads(meta_path.read_text())
        version = manifest["format_version"]
        layers = {key: LatticeConfig.parse(name) for key, name in manifest["layers"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise BadInputError(
            f"'{meta_path}' is not a liftq quantize manifest ({exc}): re-run `liftq quantize`"
        ) from None
    except LatticeConfigError as exc:
        raise BadInputError(f"'{meta_path}': {exc}: re-run `liftq quantize`") from None
    if isinstance(version, bool) or version not in READS:
        raise BadInputError(
            f"'{meta_path}' has format_version {version!r}; this liftq reads "
            f"{' and '.join(map(str, READS))}: re-run `liftq quantize` or upgrade liftq"
        )
    if not layers:
        raise BadInputError(f"'{meta_path}' lists no quantized layers: re-run `liftq quantize`")
    codes_path = require(path, CODES_FILE)
    require(path, UNQUANTIZED_FILE if version >= 2 else V1_WEIGHTS_FILE)
    shapes = {}
    with _open(codes_path) as handle:
        names = set(handle.keys())
        for key, cfg in layers.items():
            missing = [p for p in LINEAR_STATE if f"{key}.{p}" not in names]
            if f"lattice.{cfg.name}" not in names:
                missing.append(f"lattice.{cfg.name}")
            if missing:
                part = missing[0] if missing[0].startswith("lattice.") else f"{key}.{missing[0]}"
                raise BadInputError(
                    f"'{codes_path}' lacks {part}: the quantized folder is incomplete; "
                    f"re-run `liftq quantize`"
                )
            codes = handle.get_slice(f"{key}.codes")
            in_features = handle.get_slice(f"{key}.s1").get_shape()[0]
            out_features = codes.get_shape()[0]
            slices = -(-in_features // cfg.d)
            expected = (
                [out_features, slices, cfg.D]
                if codes.get_dtype() == "BOOL"
                else [out_features, words_per_row(slices, cfg.D)]
            )
            if list(codes.get_shape()) != expected:
                raise BadInputError(
                    f"'{codes_path}': {key}.codes has shape {codes.get_shape()}, {cfg.name} with "
                    f"in_features {in_features} needs {expected}: re-run `liftq quantize`"
                )
            shapes[key] = (out_features, in_features)
    with _open(path / (UNQUANTIZED_FILE if version >= 2 else V1_WEIGHTS_FILE)):
        pass
    return QuantizedFolder(path, manifest, layers, shapes, version)
