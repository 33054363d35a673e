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
    model: Path,
    out: Path,
    nproc: int,
    args: argparse.Namespace,
    device=("--device", "cpu"),
    threads: int | None = None,
) -> dict:
    """Run `liftq quantize` (`threads` per process: OMP_NUM_THREADS); returns its wall
    seconds, block reports and digest."""
    command = [str(LIFTQ), "quantize", str(model), "--out", str(out), "--config", CONFIG]
    command += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--overwrite"]
    command += [*device, "--json"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
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

    cores = os.cpu_count() or 1
    share = max(1, cores // 2)
    configs = {  # name: (processes, threads per process)
        "one": (1, share),
        "two": (2, share),
        "all": (1, cores),
    }
    with tempfile.TemporaryDirectory(prefix="liftq-scaling-") as tmp:
        model = truncated_model(args.blocks, Path(tmp))
        runs = {
            key: quantize(model, Path(tmp) / key, n, args, threads=t)
            for key, (n, t) in configs.items()
        }
    same = runs["one"]["digest"] == runs["two"]["digest"]
    shares = {key: stage_shares(run["blocks"]) for key, run in runs.items()}

    calib = CalibrationSettings(nsamples=args.nsamples, seqlen=args.seqlen)
    settings = QuantizeSettings(calibration=calib)
    cfg = LatticeConfig.parse(CONFIG)
    small = resolve_architecture("smollm2-135m")
    work = block_work(small, 0, lambda *_: cfg)
    samples = report_samples(work, small, settings, runs["one"]["blocks"])
    fitted = fit(samples, coefficients_for("cpu"))
    every_core = fit(
        report_samples(work, small, settings, runs["all"]["blocks"]), coefficients_for("cpu")
    )
    predicted = {
        n: estimate(small, settings, cfg, "cpu", n, fitted).seconds_per_block for n in (1, 2)
    }
    big = resolve_architecture("llama-70b")
    h100 = {n: estimate(big, settings, cfg, "h100", n) for n in (1, 8)}

    head = {
        "one": f"1 process x {share} thread(s)",
        "two": f"2 processes x {share} thread(s)",
        "all": f"1 process x {cores} threads",
    }
    lines = [
        "# Quantize scaling: 1 and 2 processes, and the cost model",
        "",
        f"`nice python bench/quantize_scaling.py --blocks {args.blocks} --nsamples "
        f"{args.nsamples} --seqlen {args.seqlen}`: the first {args.blocks} blocks of "
        f"smollm2-135m at {CONFIG}, default settings, on this machine's {cores} cores. The "
        "process comparison is at equal threads per process (each rank as if on its own "
        "cores); the last column is one process using every core, the best a single "
        "process does here.",
        "",
        f"Same codes, scales and whitening factors with 1 and 2 processes: **{same}** "
        f"(sha256 {runs['one']['digest'][:16]}... / {runs['two']['digest'][:16]}...). "
        "(With a different thread count per process they are not: torch's CPU reductions "
        "split by thread. The all-cores run: "
        f"{'the same' if runs['all']['digest'] == runs['one']['digest'] else 'differs'}.)",
        "",
        f"| seconds per block (mean) | {head['one']} | {head['two']} | ratio | {head['all']} |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in ("block", "whiten", "encode", "correct", "rest"):
        one, two, every = (shares[k][stage] for k in ("one", "two", "all"))
        ratio = f"{one / two:.2f}" if two > 0 else "-"
        label = {"block": "**block (wall)**", "rest": "rest (forwards, Grams, exchange)"}
        row = f"| {label.get(stage, stage)} | {one:.2f} | {two:.2f} | {ratio} | {every:.2f} |"
        lines.append(row)
    walls = {k: runs[k]["wall"] for k in runs}
    lines.append(
        f"| whole command (wall, incl. start-up) | {walls['one']:.1f} | {walls['two']:.1f} | "
        f"{walls['one'] / walls['two']:.2f} | {walls['all']:.1f} |"
    )
    lines += ["", f"Share of the block ({head['one']}): " + ", ".join(
        f"{s} {100 * shares['one'][s] / shares['one']['block']:.0f}%"
        for s in ("whiten", "encode", "correct", "rest")
    ) + "."]  # fmt: skip
    lines += [
        "",
        "## The cost model against these runs",
        "",
        f"CPU coefficients fitted to the stage times of the {head['one']} run (seconds per "
        "unit; the 2-process prediction gives each rank that speed):",
        "",
        "```",
        json.dumps({k: float(f"{v:.3g}") for k, v in fitted.seconds.items()}),
        "```",
        "",
        f"Fitted to the {head['all']} run (what `cost_coefficients.json`'s cpu entry "
        "holds; a one-process run on this machine uses them):",
        "",
        "```",
        json.dumps({k: float(f"{v:.3g}") for k, v in every_core.seconds.items()}),
        "```",
        "",
        "| seconds per block | measured | cost model |",
        "|---|---:|---:|",
        f"| {head['one']} | {shares['one']['block']:.2f} | {predicted[1]:.2f} |",
        f"| {head['two']} | {shares['two']['block']:.2f} | {predicted[2]:.2f} |",
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
    raw = {
        k: {"wall": r["wall"], "digest": r["digest"], "blocks": r["blocks"]}
        for k, r in runs.items()
    }
    raw["fitted"] = {"one": dict(fitted.seconds), "all": dict(every_core.seconds)}
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(raw, indent=1))
    print("\n".join(lines))
    if not same:
        raise SystemExit("the 1- and 2-process outputs differ")


if __name__ == "__main__":
    main()
