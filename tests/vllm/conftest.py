"""Fixtures of the vLLM tests: the .venv-vllm requirement and a packed smollm2-135m."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bench.vllm_serving import vllm_available
from tests.helpers import run_liftq as liftq

# The cheapest quantize of smollm2 that runs the whole pipeline (~3 to 4 min on 2 cores): the
# tests check serving, not quality.
FAST_QUANTIZE = (
    "--config", "LQ-16/8", "--nsamples", "2", "--seqlen", "128", "--whiten-steps", "1",
    "--correction-steps", "0", "--no-ldlq", "--independent",
)  # fmt: skip


@pytest.fixture(scope="session")
def need_vllm() -> None:
    if not vllm_available():
        message = "no .venv-vllm: run `make vllm-setup` (vLLM's CPU build and the liftq plugin)"
        if os.environ.get("CI") or os.environ.get("LIFTQ_REQUIRE_VLLM"):
            pytest.fail(message)  # .ci/run builds it: a missing one is a broken CI
        pytest.skip(message)


@pytest.fixture(scope="session")
def packed_smollm2(tmp_path_factory) -> Path:
    """smollm2-135m quantized at LQ-16/8 and packed with the defaults (host embedding, int8
    lm_head); `LIFTQ_VLLM_TEST_MODEL=out/packed` reuses a packed folder instead."""
    given = os.environ.get("LIFTQ_VLLM_TEST_MODEL")
    if given:
        return Path(given)
    root = tmp_path_factory.mktemp("smollm2")
    liftq("quantize", "smollm2-135m", *FAST_QUANTIZE, "--out", str(root / "q"))
    liftq("pack", str(root / "q"), "--out", str(root / "packed"))
    return root / "packed"
