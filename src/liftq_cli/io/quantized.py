"""Write a quantised checkpoint: a plain HF folder with de-quantised (fake-quant) weights.

`liftq eval OUT` loads it like any model. Beside the weights, `liftq_codes.safetensors` holds
every block's sign codes, row scales and whitening factors plus each used lattice matrix once
(what `liftq pack` turns into the bit-packed format), and `liftq.json` the recipe, the lattice
config of every linear and the per-block reports.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from liftq_cli import __version__
from liftq_cli.io.atomic import atomic_dir
from liftq_cli.io.weights import WeightReader
from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.pipeline import load_block_quant

QUANT_FORMAT_VERSION = 1
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def write_quantized(
    source: Path,
    work_dir: Path,
    out: Path,
    num_layers: int,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    metadata: dict,
) -> dict[str, int]:
    """Assemble `out` atomically from the source folder and the finished work dir."""
    reader = WeightReader(source)
    weights: dict[str, torch.Tensor] = {}
    codes: dict[str, torch.Tensor] = {}
    configs: dict[str, str] = {}
    used: dict[str, LatticeConfig] = {}
    for layer in range(num_layers):
        for name, quant in load_block_quant(work_dir, layer, matrices).items():
            key = f"model.layers.{layer}.{name}"
            weights[f"{key}.weight"] = quant.dequantize().contiguous()
            codes.update(quant.state(f"{key}."))
            configs[key] = quant.cfg.name
            used[quant.cfg.name] = quant.cfg
    for name in reader.names():
        if name not in weights:
            weights[name] = reader.get(name).float().contiguous()
    for name, cfg in used.items():
        codes[f"lattice.{name}"] = matrices(cfg).contiguous()
    info = dict(
        metadata, liftq_version=__version__, format_version=QUANT_FORMAT_VERSION, layers=configs
    )
    with atomic_dir(out) as tmp:
        for filename in COPIED:
            if (source / filename).is_file():
                shutil.copy2(source / filename, tmp / filename)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(codes, str(tmp / "liftq_codes.safetensors"))
        (tmp / "liftq.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return {p.name: p.stat().st_size for p in out.iterdir()}
