"""Intra-block correction ablation: what training the code latent and the scales buys.

One SmolLM2-135M decoder block (full-precision inputs, 64 x 512 calibration tokens of `wiki`)
is whitened and LDLQ-encoded as `liftq quantize` does; then `correct_block` runs with several
settings from the same start, and the block-output MSE before and after, the fraction of code
bits that changed and the time are reported. `correct_block` restores its start when training
made the block worse, so "after = before" with 0 flips means the run was rejected.
Writes bench/results/correction.md.

Usage: python bench/correction.py [--layer 3] [--config LQ-30/10]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/correction.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path set-up above
from bench.environment import versions_line  # noqa: E402
from bench.ldlq import block_inputs  # noqa: E402

from liftq_cli.data.calibration import calibration_set  # noqa: E402
from liftq_cli.data.text import load_text  # noqa: E402
from liftq_cli.io.atomic import write_text_atomic  # noqa: E402
from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve  # noqa: E402
from liftq_cli.lattice_config import LatticeConfig  # noqa: E402
from liftq_cli.quant import blocks  # noqa: E402
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block  # noqa: E402
from liftq_cli.quant.encode import quantize_linear  # noqa: E402
from liftq_cli.quant.lattice import encode  # noqa: E402
from liftq_cli.quant.lattice_catalog import load_catalog_matrix  # noqa: E402
from liftq_cli.quant.whitening import fit_whitening  # noqa: E402
from liftq_cli.quantize_job import CorrectionConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "default (codes lr 5e-4, scales lr 3e-3, 50 steps)": {},
    "scales only (codes lr 0)": {"lr_codes": 0.0},
    "codes lr 1.2e-3": {"lr_codes": 1.2e-3},
    "codes lr 2e-3": {"lr_codes": 2e-3},
    "codes lr 5e-3": {"lr_codes": 5e-3},
    "codes lr 1e-3, latent init 0.01": {"lr_codes": 1e-3, "latent_init": 0.01},
    "100 steps": {"steps": 100},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--config", default="LQ-30/10")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "correction.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    cfg = LatticeConfig.parse(args.config)
    matrix = load_catalog_matrix(cfg)
    folder = materialize(resolve("smollm2-135m"))
    ids = calibration_set(load_text("wiki"), load_tokenizer(folder), args.nsamples, 512, 0)
    layer, block, hidden, run = next(block_inputs(folder, ids.input_ids, [args.layer]))
    with torch.no_grad():
        targets = run(block, hidden)
    stats = blocks.collect_stats(block, run, hidden, 2)
    quantized = {}
    for name, linear in blocks.linear_kinds(block).items():
        gram, act = stats[name]
        weight = linear.weight.detach().float()
        wh, _ = fit_whitening(weight, gram, act, cfg.bits, steps=50, alphas=(0.0,))
        bias = None if linear.bias is None else linear.bias.detach()
        quantized[name] = (quantize_linear(weight, wh, cfg, matrix, encode, gram=gram), bias)
    rows = []
    for label, overrides in VARIANTS.items():
        trial = copy.deepcopy(block)
        init = overrides.get("latent_init", CorrectionConfig.latent_init)
        for name, (quant, bias) in quantized.items():
            blocks._set_module(trial, name, CorrectableLinear(quant, bias, init))
        began = time.perf_counter()
        result = correct_block(trial, hidden, targets, run, CorrectionConfig(**overrides))
        rows.append((label, result, time.perf_counter() - began))
        print(label, result, flush=True)
    lines = [
        f"# Intra-block correction ablation: SmolLM2-135M block {layer}, {cfg.name}",
        "",
        f"Command: `python bench/correction.py --layer {layer} --config {cfg.name}`. "
        f"{args.nsamples} x 512 calibration tokens of `wiki`, full-precision block inputs, "
        f"LDLQ-encoded start; batch 2 per step.",
        "",
        "| setting | MSE before | MSE after | change | code bits flipped | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r, seconds in rows:
        lines.append(
            f"| {label} | {r.mse_before:.5f} | {r.mse_after:.5f} | "
            f"{r.mse_after / r.mse_before - 1:+.1%} | {r.flipped:.4%} | {seconds:.0f} |"
        )
    lines += ["", versions_line()]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
