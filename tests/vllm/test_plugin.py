"""The plugin's config inside vLLM (entry point, lattice matrices, refusals): the checks in
plugin_checks.py, run by .venv-vllm's Python on the packed smollm2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from bench.vllm_serving import VLLM_VENV

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("need_vllm")]
CHECKS = Path(__file__).with_name("plugin_checks.py")


def test_plugin_config_checks_pass_in_vllm(packed_smollm2):
    python = VLLM_VENV / "bin" / "python"
    done = subprocess.run(
        [str(python), str(CHECKS), str(packed_smollm2)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    oks = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(oks) == 7, done.stdout
