"""`liftq quantize` as one library call: resolve inputs, quantise block by block, write out."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from liftq_cli.data.calibration import calibration_set
from liftq_cli.data.text import load_text
from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve
from liftq_cli.io.quantized import write_quantized
from liftq_cli.quant.configs import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.quant.pipeline import (
    QuantizeOptions,
    build_skeleton,
    linear_kinds,
    quantize_blocks,
)

BITS_TOLERANCE = 0.05


def config_for_bits(bits: float) -> LatticeConfig:
    """The catalog config nearest to `bits`; on ties, the one with the lowest Gaussian MSE
    (2.0 bits is LQ-32/16, 3.0 bits LQ-30/10)."""
    from liftq_cli.quant.lattice_catalog import catalog_manifest

    mse = {e["name"]: e["gaussian_mse"] for e in catalog_manifest()["entries"]}
    best = min(CATALOG_CONFIGS, key=lambda c: (round(abs(c.bits - bits), 6), mse.get(c.name, 1.0)))
    if abs(best.bits - bits) > BITS_TOLERANCE:
        low, high = CATALOG_CONFIGS[0].bits, CATALOG_CONFIGS[-1].bits
        raise BadInputError(
            f"--bits {bits} is outside the lattice catalog ({low:.1f} to {high:.1f} bits in 0.1 "
            f"steps): pick a value in that range or pass --config LQ-D/d"
        )
    return best


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be created, before any work starts (missing parent folders
    are fine: they are made, so the nearest existing ancestor must be writable)."""
    probe_dir = out.expanduser().resolve().parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK):
        raise BadInputError(f"--out '{out}' cannot be written: choose a writable location")
    try:
        tempfile.TemporaryFile(dir=probe_dir).close()
    except OSError as exc:
        raise BadInputError(f"--out '{out}' cannot be written ({exc.strerror})") from exc


def quantize(
    model: str,
    out: Path,
    config: LatticeConfig,
    calib: str = "wiki",
    nsamples: int = 64,
    seqlen: int = 512,
    work_dir: Path | None = None,
    options: QuantizeOptions | None = None,
    recipe_text: str | None = None,
    progress: Callable[[dict], None] | None = None,
    layers: dict[int, dict[str, LatticeConfig]] | None = None,
) -> dict:
    """Quantise `model` with lattice `config` into `out`; returns a JSON-ready summary.

    layers: per-linear overrides of a mixed recipe, {layer: {kind: config}} (kind: q_proj,
    ..., down_proj); every other linear uses `config`.
    """
    from liftq_cli.quant.lattice import encode
    from liftq_cli.quant.lattice_catalog import load_catalog_matrix

    options = options or QuantizeOptions()
    layers = layers or {}
    check_writable(out)
    for cfg in {config, *(c for kinds in layers.values() for c in kinds.values())}:
        load_catalog_matrix(cfg)  # an unknown lattice fails before any work dir is made
    folder = materialize(resolve(model))
    hf_config, skeleton = build_skeleton(folder)  # refuses unsupported architectures early
    shapes = linear_shapes(skeleton)
    check_overrides(layers, shapes)

    def config_for(layer: int, kind: str) -> LatticeConfig:
        return layers.get(layer, {}).get(kind, config)

    bits = average_bits(shapes, config_for)
    text = load_text(calib)
    calibration = calibration_set(text, load_tokenizer(folder), nsamples, seqlen, options.seed)
    work_dir = work_dir or out.with_name(f".{out.name}.work")
    settings = {
        "model": str(folder),
        "config": (folder / "config.json").read_text(),
        "lattice": config.name,
        "calibration": calibration.fingerprint,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }
    if layers:  # only mixed jobs carry the key, so uniform work dirs keep resuming
        settings["layers"] = {
            str(k): {n: c.name for n, c in sorted(v.items())} for k, v in sorted(layers.items())
        }
    began = time.perf_counter()
    reports = quantize_blocks(
        folder,
        config_for,
        calibration.input_ids,
        work_dir,
        load_catalog_matrix,
        encode,
        options,
        settings,
        progress,
    )
    metadata = {
        "model": model,
        "lattice": config.name,
        "bits": bits,
        "mixed": bool(layers),
        "calibration": {
            "source": calib,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": options.seed,
            "fingerprint": calibration.fingerprint,
        },
        "options": asdict(options),
        "recipe": recipe_text,
        "blocks": [asdict(r) for r in reports],
    }
    files = write_quantized(
        folder, work_dir, out, hf_config.num_hidden_layers, load_catalog_matrix, metadata
    )
    return {
        "model": model,
        "out": str(out),
        "config": config.name,
        "bits": bits,
        "mixed": bool(layers),
        "layers": len(reports),
        "seconds": round(time.perf_counter() - began, 2),
        "files": files,
        "work_dir": str(work_dir),
        "blocks": json.loads(json.dumps([asdict(r) for r in reports])),
    }


def linear_shapes(skeleton) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, kind) -> (out, in) of every decoder linear, read off the meta-device model."""
    return {
        (layer, name.rpartition(".")[2]): (m.out_features, m.in_features)
        for layer, block in enumerate(skeleton.model.layers)
        for name, m in linear_kinds(block).items()
    }


def check_overrides(
    layers: dict[int, dict[str, LatticeConfig]], shapes: dict[tuple[int, str], tuple[int, int]]
) -> None:
    """Refuse per-layer overrides that name a block or linear this model does not have."""
    count = 1 + max((layer for layer, _ in shapes), default=-1)
    kinds = sorted({kind for _, kind in shapes})
    for layer, overrides in sorted(layers.items()):
        if layer >= count:
            raise BadInputError(
                f"recipe overrides layer {layer} but the model has {count} layers (0 to "
                f"{count - 1}): re-run `liftq plan --write-recipe` for this model"
            )
        for kind in overrides:
            if (layer, kind) not in shapes:
                raise BadInputError(
                    f"recipe overrides layers.{layer}.{kind} but this model's linears are "
                    f"{', '.join(kinds)}: re-run `liftq plan --write-recipe` for this model"
                )


def average_bits(
    shapes: dict[tuple[int, str], tuple[int, int]], config_for: Callable[[int, str], LatticeConfig]
) -> float:
    """Code bits per weight over all decoder linears (D/d weighted by each linear's size)."""
    total = sum(o * i for o, i in shapes.values())
    bits = sum(o * i * config_for(*key).bits for key, (o, i) in shapes.items()) / max(total, 1)
    return round(bits, 6)
