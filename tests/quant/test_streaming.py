"""Streaming is real: peak RSS barely grows with the layer count (4 vs 16 layers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.quant.tiny_job import make_model

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = 512  # ~9.4 MB of fp32 weights per layer: 12 more layers add ~113 MB unless streamed


def peak_rss_mib(tmp_path: Path, layers: int) -> float:
    folder = tmp_path / f"fp{layers}"
    make_model(folder, layers=layers, hidden=HIDDEN)
    script = [sys.executable, "-m", "tests.quant.tiny_job", str(folder)]
    script += [str(tmp_path / f"work{layers}"), str(tmp_path / f"out{layers}")]
    script += [str(layers), "0", "fast"]
    child = subprocess.Popen(script, cwd=ROOT)
    _, status, usage = os.wait4(child.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / f"out{layers}" / "liftq_codes.safetensors").is_file()
    return usage.ru_maxrss / 1024  # Linux reports KiB


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_layer_count(tmp_path):
    small, large = peak_rss_mib(tmp_path, 4), peak_rss_mib(tmp_path, 16)
    print(f"peak RSS: 4 layers {small:.0f} MiB, 16 layers {large:.0f} MiB")
    weights_added = 12 * 9.4  # MiB the 12 extra layers weigh in fp32
    assert large < 1.2 * small, (small, large)
    assert large - small < weights_added / 2, (small, large)
