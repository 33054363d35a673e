"""liftq rows of the quality bench: find or make `liftq quantize` output, count its bits.

A row at B bits lives in bench/work/quality/liftq-B/ (e.g. liftq-2.4/), a `liftq quantize` output
(codes plus `liftq.json`: the lattice config of every linear and the calibration used; folders made
before the compact output hold a fake-quantised fp32 `model.safetensors`). An existing folder is
reused; otherwise `liftq quantize` runs in a child process with the bench's shared calibration text
(`--calib FILE`), window count, length and seed, and its wall time and peak RSS are recorded beside
the folder (liftq-B.run.json).

Effective bits: for every decoder linear (o x i) at LQ-D/d, the packed layout of
`liftq_cli.plan.memory` (codes ceil(ceil(i/d) * D / 32) 32-bit words per row, one fp16 scale
per row, fp16 whitening factors s1, s2, P1, P2), plus each lattice matrix M (d x D, fp32)
once, divided by the weights of those linears.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

from bench.quality_specs import VARIANTS

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.memory import lattice_matrix_bytes, packed_linear_bytes

RUN_HINT = "python bench/quality.py --rows {id}"  # what quantizes a missing liftq row


def liftq_storage_bits(
    layers: dict[str, str], shapes: dict[str, tuple[int, int]], dense_factors: bool = False
) -> tuple[int, int, str]:
    """(storage bits, weights, rule) of the linears in `shapes` quantized as `layers` says
    (dense_factors: trained rotations, every P1, P2 stored dense, as `liftq pack` does).

    layers: liftq.json's {"model.layers.L.mlp.up_proj": "LQ-24/10", ...}; shapes: the decoder
    linears' weight shapes {"model.layers.L.mlp.up_proj.weight": (out, in), ...}. Every linear
    of `shapes` must have a config (a partial output is refused with an AssertionError).
    """
    missing = [k for k in shapes if k.removesuffix(".weight") not in layers]
    assert not missing, f"liftq.json has no lattice config for {len(missing)} linears: {missing[0]}"
    total, weights, used = 0, 0, {}
    for key, (out_features, in_features) in shapes.items():
        cfg = LatticeConfig.parse(layers[key.removesuffix(".weight")])
        parts = packed_linear_bytes(out_features, in_features, cfg, dense_factors)
        total += sum(parts.values()) * 8
        weights += out_features * in_features
        used[cfg.name] = cfg
    total += sum(lattice_matrix_bytes(cfg) for cfg in used.values()) * 8
    configs = ", ".join(sorted(used))
    factors = "dense fp16 P1, P2 (trained)" if dense_factors else "P1, P2"
    rule = (
        f"packed LiftQuant ({configs}): sign codes in 32-bit words per row + fp16 row scale + "
        f"fp16 whitening s1, s2, {factors} per linear + each fp32 lattice matrix once"
    )
    return total, weights, rule


def gnu_time(path: Path) -> tuple[float, float, float] | None:
    """(wall s, wall s, peak RSS MB) from a `/usr/bin/time -v` report of a successful run."""
    if not path.is_file():
        return None
    fields = dict(
        line.strip().rsplit(": ", 1) for line in path.read_text().splitlines() if ": " in line
    )
    if fields.get("Exit status") != "0" or "Maximum resident set size (kbytes)" not in fields:
        return None
    clock = [float(x) for x in fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")]
    wall = sum(value * 60**power for power, value in enumerate(reversed(clock)))
    return wall, wall, int(fields["Maximum resident set size (kbytes)"]) / 1024


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def calibration_mismatch(info: dict, calib_txt: Path, nsamples: int, seqlen: int, seed: int) -> str:
    """Why liftq.json's calibration differs from the bench's shared one ('' when it does not)."""
    cal = info.get("calibration") or {}
    source = Path(str(cal.get("source", "")))
    same_text = source.is_file() and (
        source.resolve() == calib_txt.resolve() or _digest(source) == _digest(calib_txt)
    )
    got = (cal.get("nsamples"), cal.get("seqlen"), cal.get("seed"))
    if same_text and got == (nsamples, seqlen, seed):
        return ""
    return (
        f"calibrated on '{cal.get('source')}' (nsamples, seqlen, seed = {got}), not the bench's "
        f"shared text {calib_txt} ({nsamples}, {seqlen}, {seed}): delete the folder and re-run"
    )


def block_work_dir(spec, out: Path) -> Path:
    """The `--work-dir` of a row: a -ft row shares the block stage of its plain row."""
    mixed = "-mixed" if getattr(spec, "mixed", False) else ""
    loss = f"-{spec.correction_loss}" if getattr(spec, "correction_loss", "") else ""
    variant = f"-{spec.variant}" if getattr(spec, "variant", "") else ""
    return out.with_name(f".liftq-{spec.target_bits:.1f}{mixed}{loss}{variant}.work")


def liftq_command(liftq: Path, spec, out: Path, calib_txt: Path, args) -> list[str]:
    return [
        str(liftq), "quantize", args.model, "--out", str(out), "--bits", f"{spec.target_bits}",
        "--calib", str(calib_txt), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
        "--seed", str(args.seed), "--json", "--work-dir", str(block_work_dir(spec, out)),
        "--overwrite",  # the bench's own output folder: a re-run replaces it
    ] + ["--mixed"] * getattr(spec, "mixed", False) + tuning_flags(spec, args) + (
        ["--correction-loss", spec.correction_loss] if getattr(spec, "correction_loss", "") else []
    ) + VARIANTS.get(getattr(spec, "variant", ""), [])  # fmt: skip


def tuning_flags(spec, args) -> list[str]:
    """A -ft row's fine-tuning: its steps on `wiki` past the evaluation prefix (args.tuning_txt;
    the 64 calibration windows are too few to give every step fresh ones)."""
    steps = getattr(spec, "finetune_steps", 0)
    if not steps:
        return []
    lr = getattr(spec, "finetune_lr", 0.0)
    return ["--finetune-steps", str(steps), "--finetune-calib", str(args.tuning_txt)] + (
        ["--finetune-lr", str(lr)] if lr else []
    )


def prepare_liftq_row(
    spec,
    row,
    work: Path,
    calib_txt: Path,
    args,
    run_child: Callable[[list[str], Path, float], tuple[int, float, float]],
    shapes: dict[str, tuple[int, int]],
) -> Path | None:
    """Fill `row` (bits, library, timings or the reason it has no number); return the folder.

    args: model, nsamples, seqlen, seed, liftq_reuse_only and child_timeout_s.
    """
    out = work / spec.id
    run_file, log = work / f"{spec.id}.run.json", work / f"{spec.id}.log"
    hint = RUN_HINT.format(id=spec.id)
    if not (out / "liftq.json").is_file():
        if args.liftq_reuse_only:
            row.status = "unavailable"
            row.reason = f"not quantized yet: no {out.name}/ in {work} (run `{hint}`)"
            return None
        liftq = Path(sys.executable).with_name("liftq")
        print(f"[{spec.id}] quantizing with liftq (about 30 min on 2 cores) ...", flush=True)
        cmd = liftq_command(liftq, spec, out, calib_txt, args)
        code, wall, rss = run_child(cmd, log, args.child_timeout_s)
        run_file.write_text(json.dumps({"exit": code, "wall_s": wall, "peak_rss_mb": rss}))
        if code != 0 or not (out / "liftq.json").is_file():
            lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
            row.status = "failed"
            row.reason = f"liftq quantize exit {code}: {lines[-1] if lines else 'no output'}"
            return None
    else:
        row.reused = True
    info = json.loads((out / "liftq.json").read_text())
    why = calibration_mismatch(info, calib_txt, args.nsamples, args.seqlen, args.seed)
    if why:
        row.status, row.reason = "failed", f"{out.name}/ {why}"
        return None
    trained = info.get("options", {}).get("whiten_rotations") == "trained"
    storage, weights, row.bits_rule = liftq_storage_bits(info["layers"], shapes, trained)
    row.bits_per_weight = storage / weights
    row.total_bytes = storage // 8  # the rest is added by the evaluator
    row.library = f"liftq {info.get('liftq_version', '?')} ({info.get('lattice', '?')})"
    blocks = info.get("blocks") or []
    row.quant_seconds = sum(float(b.get("seconds", 0.0)) for b in blocks) or None
    run = json.loads(run_file.read_text()) if run_file.is_file() else {}
    fresh = run_file.is_file() and run_file.stat().st_mtime >= (out / "liftq.json").stat().st_mtime
    timed = gnu_time(work / f"{spec.id}.time.txt")
    # Blocks came from the work dir when this call's JSON-lines log has no block event
    # (however long its fine-tuning took).
    ran_blocks = log.is_file() and '"event": "block"' in log.read_text(errors="replace")
    resumed = run.get("exit") == 0 and fresh and row.quant_seconds is not None and not ran_blocks
    if resumed:  # a -ft row whose block stage its plain row ran: add that stage's time
        row.quant_seconds += run["wall_s"]
        row.child_seconds, row.peak_rss_mb = run["wall_s"], run["peak_rss_mb"]
        row.bits_rule += (
            f"; block stage resumed from {block_work_dir(spec, out).name} (run by the plain "
            f"row): quant s = its block times + this run ({run['wall_s']:.0f} s), peak RSS "
            "of this run (fine-tuning holds both models)"
        )
    elif run.get("exit") == 0 and fresh:  # made by this bench: the whole CLI call was timed
        row.quant_seconds, row.child_seconds = run["wall_s"], run["wall_s"]
        row.peak_rss_mb = run["peak_rss_mb"]
    elif timed is not None:  # run by hand under `/usr/bin/time -v` (README's command)
        row.quant_seconds, row.child_seconds, row.peak_rss_mb = timed
        row.bits_rule += (
            f"; quantized outside the bench, timed by /usr/bin/time -v ({spec.id}.time.txt)"
        )
    else:
        row.bits_rule += "; quantized outside the bench: quant s = sum of block times, no RSS"
    row.status = "quantized"
    return out
