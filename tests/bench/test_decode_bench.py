"""bench/decode.py runs end to end on a synthetic preset and reports both models side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_decode_bench_prints_dense_and_packed_side_by_side(tmp_path):
    out = tmp_path / "decode.json"
    command = [
        sys.executable, "bench/decode.py", "--synthetic", "smollm2-135m", "--layers", "1",
        "--vocab", "256", "--device", "cpu", "--dtype", "float32", "--reps", "1",
        "--new-tokens", "3", "--prompt-tokens", "4", "--prefill-rows", "5", "--json", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LIFTQ_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "decode tokens/s" in done.stdout and "1 blocks, vocab 256" in done.stdout
    report = json.loads(out.read_text())
    assert report["backend"] == "torch"
    assert [r["kind"] for r in report["layers"]][0] == "q_proj" and len(report["layers"]) == 7
    for row in report["layers"]:
        assert row["dense_us"] > 0 and row["packed_us"] > 0 and row["prefill_packed_us"] > 0
    assert report["tokens"]["dense"]["decode_tok_s"] > 0
    assert report["tokens"]["packed"]["decode_tok_s"] > 0
