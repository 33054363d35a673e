"""Seconds per block of `liftq quantize` with 1 and 2 processes, side by side, and the cost
model's estimate for Llama-3-70B on 1 and 8 H100s.

The first --blocks decoder blocks of smollm2-135m (a copy of its folder whose config says
that many layers; the weights file is linked, not copied) are quantized twice in one run,
with one process and with `--nproc 2` (gloo on this machine's cores), with the same
calibration. The two outputs must hold the same codes and scales byte for byte (checked
here). From each run's per-block reports: wall seconds per block and each stage's share
(whiten, encode and the rest of the block on the busiest rank; correction on rank 0). The
CPU cost coefficients are then fitted to the one-process stage times
(quant/costmodel.fit) and the model's prediction for both runs is shown beside the
measurement; the Llama-3-70B figures come from GPU datasheets x assumed efficiencies
(quant/cost_coefficients.json): an estimate, not a measurement. Writes
bench/results/quantize_scaling.md.

Usage: nice python bench/quantize_scaling.py [--blocks 2] [--nsamples 64] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

from bench.environment import versions_line  # noqa: E402

from liftq_cli.io.atomic import write_text_atomic  # noqa: E402
from liftq_cli.io.checkpoints import materialize, resolve  # noqa: E402
from liftq_cli.io.quantized import read_quantized  # noqa: E402
from liftq_cli.lattice_config import LatticeConfig  # noqa: E402
from liftq_cli.plan.architectures import resolve_architecture  # noqa: E402
from liftq_cli.quant.costmodel import (  # noqa: E402
    block_work,
    coefficients_for,
    estimate,
    fit,
    report_samples,
)
from liftq_cli.quantize_job import CalibrationSettings, QuantizeSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONFIG = "LQ-24/10"
LIFTQ = Path(sys.executable).parent / "liftq"


def truncated_model(blocks: int, into: Path) -> Path:
    """smollm2-135m with only its first `blocks` decoder blocks in config.json."""
    source = materialize(resolve("smollm2-135m"))
    folder = into / f"smollm2-135m-{blocks}-blocks"
    folder.mkdir()
    for item in source.iterdir():
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config["num_hidden_layers"] = blocks
            (folder / item.name).write_text(json.dumps(config, indent=2))
        else:
            (folder / item.name).symlink_to(item)
    return folder


def digest(out: Path) -> str:
    """sha256 of every linear's codes and scales and whitening factors, by name."""
    sha = hashlib.sha256()
    states = read_quantized(out).linear_states()
    for name in sorted(states):
        for part in sorted(states[name]):
            tensor = states[name][part].contiguous()
            sha.update(f"{name}.{part}".encode())
            sha.update(tensor.numpy().tobytes())
    return sha.hexdigest()


def quantize(
    model: Path, out: Path, nproc: int, args: argparse.Namespace, device=("--device", "cpu")
) -> dict:
    """Run `liftq quantize`; returns its wall seconds, block reports and digest."""
    command = [str(LIFTQ), "quantize", str(model), "--out", str(out), "--config", CONFIG]
    command += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--overwrite"]
    command += [*device, "--json"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    blocks = [json.loads(line) for line in done.stdout.splitlines() if '"event": "block"' in line]
    return {"wall": wall, "blocks": blocks, "digest": digest(out)}


def stage_shares(blocks: list[dict]) -> dict[str, float]:
    """Mean seconds per block of whiten, encode, correct and the rest (forwards, Grams,
    exchanges)."""
    n = len(blocks)
    whiten = sum(b["seconds_whiten"] for b in blocks) / n
    encode = sum(b["seconds_encode"] for b in blocks) / n
    correct = sum(b["seconds_correct"] for b in blocks) / n
    total = sum(b["seconds"] for b in blocks) / n
    return {"whiten": whiten, "encode": encode, "correct": correct, "rest": total - whiten
            - encode - correct, "block": total}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantize_scaling.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="liftq-scaling-") as tmp:
        model = truncated_model(args.blocks, Path(tmp))
        runs = {n: quantize(model, Path(tmp) / f"q{n}", n, args) for n in (1, 2)}
    same = runs[1]["digest"] == runs[2]["digest"]
    shares = {n: stage_shares(run["blocks"]) for n, run in runs.items()}

    settings = QuantizeSettings(calibration=CalibrationSettings(args.nsamples, args.seqlen))
    cfg = LatticeConfig.parse(CONFIG)
    small = resolve_architecture("smollm2-135m")
    work = block_work(small, 0, lambda *_: cfg)
    fitted = fit(report_samples(work, small, settings, runs[1]["blocks"]), coefficients_for("cpu"))
    predicted = {
        n: estimate(small, settings, cfg, "cpu", n, fitted).seconds_per_block for n in (1, 2)
    }
    big = resolve_architecture("llama-70b")
    h100 = {n: estimate(big, settings, cfg, "h100", n) for n in (1, 8)}

    cores = os.cpu_count()
    lines = [
        "# Quantize scaling: 1 and 2 processes, and the cost model",
        "",
        f"`nice python bench/quantize_scaling.py --blocks {args.blocks} --nsamples "
        f"{args.nsamples} --seqlen {args.seqlen}`: the first {args.blocks} blocks of "
        f"smollm2-135m at {CONFIG}, default settings, on this machine's {cores} cores (the "
        "2-process run gives each process its share of the threads; rank 0 borrows the "
        "others' while it corrects).",
        "",
        f"Same codes, scales and whitening factors with 1 and 2 processes: **{same}** "
        f"(sha256 {runs[1]['digest'][:16]}... / {runs[2]['digest'][:16]}...).",
        "",
        "| seconds per block (mean) | 1 process | 2 processes | ratio 1/2 |",
        "|---|---:|---:|---:|",
    ]
    for stage in ("block", "whiten", "encode", "correct", "rest"):
        one, two = shares[1][stage], shares[2][stage]
        ratio = f"{one / two:.2f}" if two > 0 else "-"
        label = {"block": "**block (wall)**", "rest": "rest (forwards, Grams, exchange)"}
        lines.append(f"| {label.get(stage, stage)} | {one:.2f} | {two:.2f} | {ratio} |")
    lines.append(
        f"| whole command (wall, incl. start-up) | {runs[1]['wall']:.1f} | "
        f"{runs[2]['wall']:.1f} | {runs[1]['wall'] / runs[2]['wall']:.2f} |"
    )
    lines += ["", "Share of the block (1 process): " + ", ".join(
        f"{s} {100 * shares[1][s] / shares[1]['block']:.0f}%"
        for s in ("whiten", "encode", "correct", "rest")
    ) + "."]  # fmt: skip
    lines += [
        "",
        "## The cost model against these runs",
        "",
        "CPU coefficients fitted to the 1-process stage times (seconds per unit):",
        "",
        "```",
        json.dumps({k: float(f"{v:.3g}") for k, v in fitted.seconds.items()}),
        "```",
        "",
        "| seconds per block | measured | cost model |",
        "|---|---:|---:|",
        f"| 1 process | {shares[1]['block']:.2f} | {predicted[1]:.2f} |",
        f"| 2 processes | {shares[2]['block']:.2f} | {predicted[2]:.2f} |",
        "",
        "## Llama-3-70B on H100s: an estimate",
        "",
        "Not a measurement: H100 datasheet peaks x the assumed efficiencies in "
        "`src/liftq_cli/quant/cost_coefficients.json`, the same settings "
        f"({args.nsamples} x {args.seqlen} calibration tokens, {CONFIG}). A GPU run of "
        "`bench/gpu_check.sh` measures the real stage times; fitted coefficients replace "
        "these.",
    ]
    for n, est in h100.items():
        lines += [
            "",
            f"### {n} x H100: {est.seconds_per_block:.1f} s per block, "
            f"{est.total_seconds / 3600:.2f} h for {est.layers} blocks (estimate)",
            "",
            "```",
            est.how(),
            "```",
        ]
    lines += ["", versions_line(), ""]
    write_text_atomic(args.out, "\n".join(lines))
    print("\n".join(lines))
    if not same:
        raise SystemExit("the 1- and 2-process outputs differ")


if __name__ == "__main__":
    main()
