"""Write a quantised checkpoint: a plain HF folder with de-quantised (fake-quant) weights.

`liftq eval OUT` loads it like any model. Beside the weights, `liftq_codes.safetensors` holds
every block's sign codes, row scales and whitening factors plus each used lattice matrix once
(what `liftq pack` turns into the bit-packed format), and `liftq.json` the recipe, the lattice
config of every linear and the per-block reports.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from liftq_cli import __version__
from liftq_cli.io.atomic import atomic_dir
from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME, TensorSpec, write_streaming
from liftq_cli.io.weights import WeightReader
from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.layerwise import QuantizedLinear
from liftq_cli.quant.pipeline import load_block_quant
from liftq_cli.quant.whitening import Whitening

QUANT_FORMAT_VERSION = 1
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


def _block_layout(work_dir: Path, layer: int) -> tuple[list[TensorSpec], dict[str, LatticeConfig]]:
    """Specs of a finished block's stored tensors (prefixed) and the config of each linear."""
    specs, configs = [], {}
    with safe_open(Path(work_dir) / f"block_{layer:04d}.safetensors", framework="pt") as handle:
        for key in sorted(handle.keys()):
            if key.endswith(".lattice"):
                D, d = (int(v) for v in handle.get_tensor(key).tolist())
                configs[key[: -len(".lattice")]] = LatticeConfig(D, d)
                continue
            piece = handle.get_slice(key)
            dtype = DTYPES_BY_NAME[piece.get_dtype()]
            specs.append(TensorSpec(f"model.layers.{layer}.{key}", dtype, tuple(piece.get_shape())))
    return specs, configs


def _retuned(quant: QuantizedLinear, name: str, tuned: dict[str, torch.Tensor]) -> QuantizedLinear:
    """`quant` with the fine-tuned scale and whitening scales of linear `name`, if any."""
    if f"{name}.scale" not in tuned:
        return quant
    wh = quant.whitening
    whitening = Whitening(tuned[f"{name}.s1"], wh.p1, wh.p2, tuned[f"{name}.s2"])
    return replace(quant, scale=tuned[f"{name}.scale"], whitening=whitening)


def write_quantized(
    source: Path,
    work_dir: Path,
    out: Path,
    num_layers: int,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    metadata: dict,
    tuned: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Assemble `out` atomically from the source folder and the finished work dir.

    tuned: tensors that model-level fine-tuning changed, by checkpoint name (a linear's
    `.scale`, `.s1`, `.s2` and norm weights); they replace the block-stage / source values.
    Streams: tensors are produced and written one at a time (one block's quantised linears
    in memory at most), so peak memory does not grow with the layer count.
    """
    tuned = tuned or {}
    reader = WeightReader(source)
    code_specs: list[TensorSpec] = []
    configs: dict[str, str] = {}
    used: dict[str, LatticeConfig] = {}
    quant_shapes: dict[str, tuple[int, int]] = {}
    for layer in range(num_layers):
        specs, layer_configs = _block_layout(work_dir, layer)
        code_specs.extend(specs)
        by_name = {spec.name: spec for spec in specs}
        for name, cfg in layer_configs.items():
            key = f"model.layers.{layer}.{name}"
            configs[key] = cfg.name
            used[cfg.name] = cfg
            out_features = by_name[f"{key}.codes"].shape[0]
            quant_shapes[f"{key}.weight"] = (out_features, by_name[f"{key}.s1"].shape[0])
    for name, cfg in sorted(used.items()):
        code_specs.append(TensorSpec(f"lattice.{name}", torch.float32, (cfg.d, cfg.D)))
    names = sorted(set(reader.names()) | set(quant_shapes), key=lambda n: (_layer_of(n), n))
    weight_specs = [
        TensorSpec(n, torch.float32, quant_shapes.get(n) or reader.shape(n)) for n in names
    ]

    cached: dict[int, dict[str, QuantizedLinear]] = {}

    def block(layer: int) -> dict[str, QuantizedLinear]:
        if layer not in cached:
            cached.clear()  # keep one block in memory
            cached[layer] = {
                name: _retuned(quant, f"model.layers.{layer}.{name}", tuned)
                for name, quant in load_block_quant(work_dir, layer, matrices).items()
            }
        return cached[layer]

    def produce_weight(spec: TensorSpec) -> torch.Tensor:
        if spec.name not in quant_shapes:
            return tuned[spec.name] if spec.name in tuned else reader.get(spec.name).float()
        layer = _layer_of(spec.name)
        local = spec.name[len(f"model.layers.{layer}.") : -len(".weight")]
        return block(layer)[local].dequantize().contiguous()

    block_state: dict[int, dict[str, torch.Tensor]] = {}

    def produce_code(spec: TensorSpec) -> torch.Tensor:
        if spec.name.startswith("lattice."):
            return matrices(used[spec.name[len("lattice.") :]]).float().contiguous()
        if spec.name in tuned:
            return tuned[spec.name]
        layer = _layer_of(spec.name)
        if layer not in block_state:
            block_state.clear()
            block_state[layer] = load_file(Path(work_dir) / f"block_{layer:04d}.safetensors")
        return block_state[layer][spec.name[len(f"model.layers.{layer}.") :]]

    info = dict(
        metadata, liftq_version=__version__, format_version=QUANT_FORMAT_VERSION, layers=configs
    )
    with atomic_dir(out) as tmp:
        for filename in COPIED:
            if (source / filename).is_file():
                shutil.copy2(source / filename, tmp / filename)
        write_streaming(tmp / "model.safetensors", weight_specs, produce_weight, {"format": "pt"})
        write_streaming(tmp / "liftq_codes.safetensors", code_specs, produce_code)
        (tmp / "liftq.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return {p.name: p.stat().st_size for p in out.iterdir()}
