"""Block-stage ablation: what each part of whitening, encoding and correction buys, one at a time.

One SmolLM2-135M decoder block (full-precision inputs) is whitened, encoded and corrected as
`liftq quantize` does, once with the default settings and once per change, and every variant
is judged on the same 4 held-out windows of `wiki` that no variant calibrates or trains on:
the block-output MSE against the full-precision block on them, before and after correction,
the code bits correction flipped, the step it kept and the seconds it took. Encodings
(whitening + LDLQ + row scales) are shared by the correction variants that start from them.

Writes bench/results/correction.md.

Usage: python bench/correction.py [--layer 3] [--config LQ-24/10]
"""

from __future__ import annotations

import argparse
import copy
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
from liftq_cli.quant import blocks  # noqa: E402
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block  # noqa: E402
from liftq_cli.quant.encode import quantize_linear  # noqa: E402
from liftq_cli.quant.lattice_catalog import catalog_encode, load_catalog_matrix  # noqa: E402
from liftq_cli.quant.whitening import fit_whitening  # noqa: E402
from liftq_cli.quantize_job import EFFORTS, CorrectionConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HELD = 4  # judged windows, after the calibration ones
DEFAULT = CorrectionConfig()
FAST = replace(DEFAULT, **EFFORTS["fast"]["correction"])
# (label, encoding, correction config, start latents from the encoder's pre-sign values)
ENCODINGS = {
    "default": {"windows": 64, "rotations": "fixed", "ldlq": True},
    "trained rotations": {"windows": 64, "rotations": "trained", "ldlq": True},
    "no LDLQ (AWQ scales instead)": {"windows": 64, "rotations": "fixed", "ldlq": False},
    "16 calibration windows": {"windows": 16, "rotations": "fixed", "ldlq": True},
    "32 calibration windows": {"windows": 32, "rotations": "fixed", "ldlq": True},
}
VARIANTS = [
    ("default", "default", DEFAULT, True),
    ("no correction", "default", replace(DEFAULT, steps=0), True),
    ("codes frozen (scales only)", "default", replace(DEFAULT, lr_codes=0.0), True),
    ("uniform latent start (0.05 every bit)", "default", replace(DEFAULT, latent_init=0.05), False),
    ("50 steps", "default", replace(DEFAULT, steps=50), True),
    ("200 steps, patience 4", "default", replace(DEFAULT, steps=200, patience=4), True),
    ("effort fast (at most 40 steps, 2 windows held out)", "default", FAST, True),
    ("no early stopping (no windows held out)", "default", replace(DEFAULT, heldout=0), True),
    ("trained rotations (Cayley P1, P2)", "trained rotations", DEFAULT, True),
    ("no LDLQ (AWQ scales instead)", "no LDLQ (AWQ scales instead)", DEFAULT, True),
    ("16 calibration windows", "16 calibration windows", DEFAULT, True),
    ("32 calibration windows", "32 calibration windows", DEFAULT, True),
]


def encode_block(block, run, hidden, cfg, matrix, windows: int, rotations: str, ldlq: bool):
    """{name: (QuantizedLinear, bias)} of the block encoded on its first `windows` windows."""
    stats = blocks.collect_stats(block, run, hidden[:windows], 2)
    out = {}
    for index, (name, linear) in enumerate(blocks.linear_kinds(block).items()):
        gram, act = stats[name]
        weight = linear.weight.detach().float()
        wh, _ = fit_whitening(
            weight,
            gram,
            act,
            cfg.bits,
            steps=50,
            seed=3 * 16 + index,
            alphas=(0.0,) if ldlq else (0.0, 0.25, 0.5, 0.75),
            rotations=rotations,
        )
        quant = quantize_linear(weight, wh, cfg, matrix, catalog_encode, gram if ldlq else None)
        out[name] = (quant, None if linear.bias is None else linear.bias.detach())
    return out


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
    for name, spec in ENCODINGS.items():
        began = time.perf_counter()
        encodings[name] = encode_block(
            block, run, hidden, cfg, matrix, spec["windows"], spec["rotations"], spec["ldlq"]
        )
        encode_seconds[name] = time.perf_counter() - began
        print(f"encoded: {name} ({encode_seconds[name]:.0f} s)", flush=True)
    rows = []
    for label, encoding, config, presign in VARIANTS:
        trial = copy.deepcopy(block)
        for name, (quant, bias) in encodings[encoding].items():
            margin = quant.margin if presign else None
            correctable = CorrectableLinear(quant, bias, config.latent_init, margin)
            blocks._set_module(trial, name, correctable)
        windows = ENCODINGS[encoding]["windows"]
        began = time.perf_counter()  # correction holds its own windows out of these
        result = correct_block(trial, hidden[:windows], targets[:windows], run, config)
        seconds = time.perf_counter() - began
        with torch.no_grad():
            before = float((run(block_copy(encodings[encoding], block), hidden[held])
                            - targets[held]).pow(2).mean())  # fmt: skip
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


def block_copy(encoding, block):
    """The block computing with the encoding as it is (no training)."""
    trial = copy.deepcopy(block)
    for name, (quant, bias) in encoding.items():
        blocks._set_module(trial, name, CorrectableLinear(quant, bias, 1.0))
    return trial


if __name__ == "__main__":
    main()
