"""Block-stage ablation: what each part of whitening, encoding and correction buys, one at a time.

One SmolLM2-135M decoder block (full-precision inputs) is whitened, encoded and corrected as
`liftq quantize` does, once with the default settings and once per change, and every variant
is judged on the same 4 held-out windows of `wiki` that no variant calibrates or trains on:
the block-output MSE against the full-precision block on them, before and after correction,
the code bits correction flipped, the step it kept and the seconds it took. Encodings
(quant/block_encode.py: dataflow stages, compensation toward the full-precision output,
whitening, LDLQ, row scales) are shared by the correction variants that start from them.

Writes bench/results/correction.md.

Usage: python bench/correction.py [--layer 3] [--config LQ-24/10]
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from dataclasses import replace
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
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block  # noqa: E402
from liftq_cli.quant.block_encode import encode_block  # noqa: E402
from liftq_cli.quant.lattice_catalog import catalog_encode, load_catalog_matrix  # noqa: E402
from liftq_cli.quant.parallel import SOLO, Team  # noqa: E402
from liftq_cli.quantize_job import EFFORTS, QuantizeSettings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HELD = 4  # judged windows, after the calibration ones
DEFAULT = QuantizeSettings()
CORRECT = DEFAULT.correction
FAST = replace(CORRECT, **EFFORTS["fast"]["correction"])
STAGED = replace(DEFAULT, true_sequential=True, compensate=True)  # --true-sequential --compensate
# encoding label: (settings the block is whitened and encoded with, calibration windows)
ENCODINGS = {
    "default": (DEFAULT, 64),
    "staged": (replace(DEFAULT, true_sequential=True), 64),
    "staged, compensated": (STAGED, 64),
    "staged, compensated, damp 0.01": (replace(STAGED, compensate_damp=0.01), 64),
    "staged, compensated, damp 1.0": (replace(STAGED, compensate_damp=1.0), 64),
    "trained rotations": (replace(DEFAULT, whiten_rotations="trained"), 64),
    "no LDLQ (AWQ scales instead)": (replace(DEFAULT, ldlq=False), 64),
    "16 calibration windows": (DEFAULT, 16),
    "32 calibration windows": (DEFAULT, 32),
}
# (label, encoding, correction config, start latents from the encoder's pre-sign values)
VARIANTS = [
    ("default", "default", CORRECT, True),
    ("no correction", "default", replace(CORRECT, steps=0), True),
    ("codes frozen (scales only)", "default", replace(CORRECT, lr_codes=0.0), True),
    ("uniform latent start (0.05 every bit)", "default", CORRECT, False),
    ("rates / 5 (codes 2e-4, scales 1.2e-3)", "default",
     replace(CORRECT, lr_codes=CORRECT.lr_codes / 5, lr_scales=CORRECT.lr_scales / 5), True),
    ("200 steps, patience 4", "default", replace(CORRECT, steps=200, patience=4), True),
    ("effort fast (at most 40 steps, 2 windows held out)", "default", FAST, True),
    ("no early stopping (no windows held out)", "default", replace(CORRECT, heldout=0), True),
    ("staged (--true-sequential)", "staged", CORRECT, True),
    ("staged, compensated (--compensate)", "staged, compensated", CORRECT, True),
    ("staged, compensated, no correction", "staged, compensated", replace(CORRECT, steps=0), True),
    ("staged, compensated, rates / 5", "staged, compensated",
     replace(CORRECT, lr_codes=CORRECT.lr_codes / 5, lr_scales=CORRECT.lr_scales / 5), True),
    ("staged, compensated, damp 0.01", "staged, compensated, damp 0.01", CORRECT, True),
    ("staged, compensated, damp 1.0", "staged, compensated, damp 1.0", CORRECT, True),
    ("trained rotations (Cayley P1, P2)", "trained rotations", CORRECT, True),
    ("no LDLQ (AWQ scales instead)", "no LDLQ (AWQ scales instead)", CORRECT, True),
    ("16 calibration windows", "16 calibration windows", CORRECT, True),
    ("32 calibration windows", "32 calibration windows", CORRECT, True),
]  # fmt: skip


def encoded_block(block, layer, run, hidden, cfg, matrix, settings, windows: int):
    """A copy of `block` whitened and encoded as `liftq quantize` does (quant/block_encode.py:
    stages, compensation, LDLQ) on its first `windows` windows; its linears are
    `CorrectableLinear`s, latents started from the encoder's pre-sign values."""
    trial = copy.deepcopy(block)
    team = Team(SOLO, settings.correction.batch, windows)
    encode = functools.partial(catalog_encode, beam=settings.search_beam)
    config_for, matrices = (lambda *_: cfg), (lambda _: matrix)
    encode_block(trial, layer, hidden[:windows], run, config_for, matrices, encode, settings, team)
    return trial


def uniform_latents(block, value: float) -> None:
    """Every code latent at +-value (the start before pre-sign values were used)."""
    for module in block.modules():
        if isinstance(module, CorrectableLinear):
            module.latent.data = module.latent.data.sign() * value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--config", default="LQ-24/10")
    parser.add_argument("--out", type=Path, default=RESULTS / "correction.md")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    cfg = LatticeConfig.parse(args.config)
    matrix = load_catalog_matrix(cfg)
    folder = materialize(resolve("smollm2-135m"))
    ids = calibration_set(load_text("wiki"), load_tokenizer(folder), 64 + HELD, 512, 0)
    layer, block, hidden, run = next(block_inputs(folder, ids.input_ids, [args.layer]))
    with torch.no_grad():
        targets = run(block, hidden)
    held = slice(hidden.shape[0] - HELD, hidden.shape[0])
    encodings, encode_seconds = {}, {}
    for name, (settings, windows) in ENCODINGS.items():
        began = time.perf_counter()
        encodings[name] = encoded_block(block, layer, run, hidden, cfg, matrix, settings, windows)
        encode_seconds[name] = time.perf_counter() - began
        print(f"encoded: {name} ({encode_seconds[name]:.0f} s)", flush=True)
    rows = []
    for label, encoding, config, presign in VARIANTS:
        trial = copy.deepcopy(encodings[encoding])
        if not presign:
            uniform_latents(trial, 0.05)
        windows = ENCODINGS[encoding][1]
        began = time.perf_counter()  # correction holds its own windows out of these
        result = correct_block(trial, hidden[:windows], targets[:windows], run, config)
        seconds = time.perf_counter() - began
        with torch.no_grad():
            before = float((run(encodings[encoding], hidden[held]) - targets[held]).pow(2).mean())
            after = float((run(trial, hidden[held]) - targets[held]).pow(2).mean())
        rows.append((label, before, after, result, seconds, encode_seconds[encoding]))
        print(label, f"{before:.5f} -> {after:.5f}", result, flush=True)
    reference = rows[1][2]  # the default encoding, uncorrected
    lines = [
        f"# Block-stage ablation: SmolLM2-135M block {layer}, {cfg.name}",
        "",
        f"Command: `python bench/correction.py --layer {layer} --config {cfg.name}`. "
        f"Calibration: up to 64 x 512-token windows of `wiki`; every row is judged on the same "
        f"{HELD} further windows, never calibrated, trained or early-stopped on (block-output "
        "MSE against the full-precision block, full-precision inputs). Correction holds "
        "`heldout` of its calibration windows out for early stopping, as in `liftq quantize`. "
        "One change per row against `default`; "
        "`vs no correction`: the row's held-out MSE against the default encoding uncorrected.",
        "",
        "| variant | held-out MSE encoded | held-out MSE corrected | vs no correction | "
        "code bits flipped | step kept | correction s | encoding s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, before, after, r, seconds, encoded in rows:
        lines.append(
            f"| {label} | {before:.5f} | {after:.5f} | {after / reference - 1:+.1%} | "
            f"{r.flipped:.4%} | {r.steps} | {seconds:.0f} | {encoded:.0f} |"
        )
    lines += ["", versions_line()]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
