"""The quality bench's shared inputs and its quantization children.

`prepare` tokenizes both texts once, keeps the evaluation prefixes and writes the shared
calibration windows (and the -ft rows' fine-tuning text) under bench/work/quality/. `quantize`
runs a row's child (bench/quality_peers.py, in the peer venv or this one) once per settings
key and reads back its bits accounting; `run_child` times it and measures its peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from bench.quality_report import TEXTS, Row
from bench.quality_specs import (
    CALIB_OFFSET,
    CHILD,
    CHILD_CODE,
    CHILD_TIMEOUT_S,
    LIFTQ_ONLY,
    MODEL,
    PEER_VENV,
    ROOT,
    WORK,
    Spec,
)


@dataclass
class Inputs:
    folder: Path
    tokenizer: object
    eval_ids: dict[str, torch.Tensor]
    calib_pt: Path
    calib_txt: Path
    tuning_txt: Path  # `wiki` past the evaluation prefix: the -ft rows' fine-tuning text
    calib_fingerprint: str
    seqlen: int
    seed: int


def prepare(args: argparse.Namespace) -> Inputs:
    from liftq_cli.data.calibration import sample_windows, tokenize
    from liftq_cli.data.text import load_text
    from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve

    folder = materialize(resolve(MODEL))
    tokenizer = load_tokenizer(folder)
    from bench.texts import text_source

    texts = {name: tokenize(tokenizer, load_text(text_source(name)).text) for name in TEXTS}
    eval_ids = {name: ids[: args.max_tokens] for name, ids in texts.items()}
    windows = sample_windows(texts["wiki"][CALIB_OFFSET:], args.nsamples, args.seqlen, args.seed)
    fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    calib_dir = WORK / f"calib-{fingerprint}"
    calib_dir.mkdir(parents=True, exist_ok=True)
    calib_pt, calib_txt = calib_dir / "windows.pt", calib_dir / "windows.txt"
    if not calib_pt.is_file():
        torch.save(windows, calib_pt)
        calib_txt.write_text("\n\n".join(tokenizer.decode(w) for w in windows.tolist()))
    tuning_txt = WORK / f"wiki-after-{CALIB_OFFSET}.txt"
    if not tuning_txt.is_file():
        tuning_txt.write_text(tokenizer.decode(texts["wiki"][CALIB_OFFSET:].tolist()))
    return Inputs(
        folder,
        tokenizer,
        eval_ids,
        calib_pt,
        calib_txt,
        tuning_txt,
        fingerprint,
        args.seqlen,
        args.seed,
    )


def run_child(cmd: list[str], log: Path, timeout_s: float) -> tuple[int, float, float]:
    """Run `cmd`; return (exit status, wall seconds, peak RSS in MB of it and its children)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def first_error_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else "no output"


def quantize(spec: Spec, inputs: Inputs, row: Row) -> Path | None:
    """Run the row's child once per settings (reused afterwards); return its work dir."""
    python = Path(sys.executable) if spec.venv == "product" else PEER_VENV / "bin" / "python"
    if not python.exists():
        row.status, row.reason = (
            "failed",
            (
                f"peer venv {PEER_VENV.relative_to(ROOT)} is missing: run bench/setup_peers.sh "
                f"(make bench-quality does)"
            ),
        )
        return None
    settings = {
        # the liftq-only fields came after these rows were keyed: left out, so adding them
        # did not re-run every peer
        "spec": {k: v for k, v in spec.__dict__.items() if k not in LIFTQ_ONLY},
        "model": str(inputs.folder),
        "calib": inputs.calib_fingerprint,
        "seed": inputs.seed,
        "python": str(python),
        # the quantizing code itself: editing it re-runs the rows it may have changed
        "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in CHILD_CODE],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = WORK / f"{spec.id}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if (out / "meta.json").is_file() and run_file.is_file():
        row.reused = True
    else:
        cmd = [
            str(python), str(CHILD), spec.method, "--model-dir", str(inputs.folder),
            "--out", str(out), "--calib", str(inputs.calib_pt),
            "--calib-text", str(inputs.calib_txt), "--seqlen", str(inputs.seqlen),
            "--bits", str(spec.bits), "--group", str(spec.group), "--ftype", spec.ftype or "none",
            "--llama-dir", str(PEER_VENV / "llama.cpp"), "--seed", str(inputs.seed),
            "--iters", str(spec.iters), "--avg-bits", str(spec.target_bits),
        ]  # fmt: skip
        print(f"[{spec.id}] quantizing ({python.parent.parent.name}) ...", flush=True)
        code, wall, rss = run_child(cmd, out / "child.log", CHILD_TIMEOUT_S)
        run_file.write_text(json.dumps({"exit": code, "wall_s": wall, "peak_rss_mb": rss}))
    run = json.loads(run_file.read_text())
    row.child_seconds, row.peak_rss_mb = run["wall_s"], run["peak_rss_mb"]
    if not (out / "meta.json").is_file():
        error = out / "error.txt"
        reason = error.read_text().strip() if error.is_file() else ""
        row.status = "failed"
        row.reason = reason or f"exit {run['exit']}: {first_error_line(out / 'child.log')}"
        return None
    meta = json.loads((out / "meta.json").read_text())
    row.quant_seconds = meta["quant_seconds"]
    row.bits_per_weight = meta["linear_storage_bits"] / meta["linear_weights"]
    row.bits_rule, row.library = meta["bits_rule"], meta["library"]
    row.total_bytes = meta["linear_storage_bits"] // 8  # the rest is added by the evaluator
    row.status = "quantized"
    return out
