"""Layerwise encoding ablation: plain nearest encoding against LDLQ error feedback.

For decoder blocks of SmolLM2-135M (full-precision inputs, the bench's calibration text), every
linear is whitened and encoded three ways, and its relative output error on the calibration
activations, tr(E H E^T) / tr(W H W^T) with H = X^T X, is reported:

- `plain`: the AWQ exponent picked on the uniform proxy from (0, 0.25, 0.5, 0.75), then every
  d-slice encoded to its nearest lattice point (liftq before LDLQ, `--no-ldlq`);
- `ldlq+awq`: the same whitening, slices encoded with LDLQ error feedback;
- `ldlq`: LDLQ on a pure rotation (AWQ exponent 0), the default of `liftq quantize`.

Both use 50 whitening steps against the proxy. Writes bench/results/ldlq.md.

Usage: python bench/ldlq.py [--layers 3,15] [--config LQ-30/10] [--nsamples 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/ldlq.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch
from bench.environment import versions_line

from liftq_cli.data.calibration import calibration_set
from liftq_cli.data.text import load_text
from liftq_cli.io.atomic import write_text_atomic
from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve
from liftq_cli.io.weights import WeightReader
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant import blocks, decoder, exchange
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.lattice import encode
from liftq_cli.quant.lattice_catalog import load_catalog_matrix
from liftq_cli.quant.whitening import fit_whitening

RESULTS = Path(__file__).parent / "results"
AWQ = (0.0, 0.25, 0.5, 0.75)


def block_inputs(folder: Path, ids: torch.Tensor, layers: list[int]):
    """Yield (layer, block, full-precision block input, run) for each requested layer."""
    config, skeleton = blocks.build_skeleton(folder)
    reader = WeightReader(folder)
    layers_list = decoder.find_layers(skeleton, config.num_hidden_layers)
    base = decoder.load_backbone(skeleton, reader, torch.device("cpu"))
    calls = decoder.layer_calls(base, layers_list, ids.shape[1])
    hidden = decoder.embed(base, layers_list, ids, 2)
    decoder.release_backbone(base)
    for layer in range(max(layers) + 1):
        block = layers_list[layer]
        blocks.load_block(block, reader, f"{decoder.LAYERS}.{layer}.")
        run = blocks.block_runner(calls[layer], 2)
        if layer in layers:
            yield layer, block, hidden, run
        with torch.no_grad():
            hidden = run(block, hidden)
        block.to("meta")


def relative_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    err = weight - approx
    return float(((err @ gram) * err).sum() / ((weight @ gram) * weight).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,15")
    parser.add_argument("--config", default="LQ-30/10")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib", default="wiki")
    parser.add_argument("--out", type=Path, default=RESULTS / "ldlq.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    layers = [int(x) for x in args.layers.split(",")]
    cfg = LatticeConfig.parse(args.config)
    matrix = load_catalog_matrix(cfg)
    folder = materialize(resolve("smollm2-135m"))
    ids = calibration_set(
        load_text(args.calib), load_tokenizer(folder), args.nsamples, args.seqlen, 0
    ).input_ids
    rows = []
    began = time.perf_counter()
    for layer, block, hidden, run in block_inputs(folder, ids, layers):
        stats = blocks.collect_stats(block, run, hidden, 2)
        for name, linear in exchange.linear_kinds(block).items():
            weight = linear.weight.detach().float()
            gram, act = stats[name]
            errors = {}
            for label, alphas, feedback in (
                ("plain", AWQ, False),
                ("ldlq+awq", AWQ, True),
                ("ldlq", (0.0,), True),
            ):
                wh, _ = fit_whitening(weight, gram, act, cfg.bits, steps=50, alphas=alphas)
                quant = quantize_linear(
                    weight, wh, cfg, matrix, encode, gram=gram if feedback else None
                )
                errors[label] = relative_error(weight, quant.dequantize(), gram)
            rows.append((layer, name, errors))
            print(layer, name, {k: round(v, 5) for k, v in errors.items()}, flush=True)
    lines = [
        f"# Layerwise encoding ablation: SmolLM2-135M, {cfg.name}",
        "",
        f"Command: `python bench/ldlq.py --layers {args.layers} --config {cfg.name} "
        f"--nsamples {args.nsamples}` ({time.perf_counter() - began:.0f} s on "
        f"{torch.get_num_threads()} threads). Calibration: {args.nsamples} x {args.seqlen} "
        f"tokens of `{args.calib}`, full-precision block inputs.",
        "",
        "Relative output error tr(E H E^T) / tr(W H W^T) per linear (lower is better).",
        "",
        "| layer | linear | plain (AWQ pick) | LDLQ + AWQ pick | LDLQ, rotation only | "
        "LDLQ / plain |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for layer, name, e in rows:
        lines.append(
            f"| {layer} | {name} | {e['plain']:.5f} | {e['ldlq+awq']:.5f} | {e['ldlq']:.5f} | "
            f"{e['ldlq'] / e['plain']:.2f} |"
        )
    mean = {k: sum(e[k] for _, _, e in rows) / len(rows) for k in rows[0][2]}
    lines.append(
        f"| all | mean | {mean['plain']:.5f} | {mean['ldlq+awq']:.5f} | {mean['ldlq']:.5f} | "
        f"{mean['ldlq'] / mean['plain']:.2f} |"
    )
    lines += ["", versions_line()]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
