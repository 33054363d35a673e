"""Shared fixtures. The real model is converted once into the user's liftq cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from liftq_cli.cli.app import app
from liftq_cli.io.checkpoints import load_model, load_tokenizer, materialize, resolve


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The bundled SmolLM2-135M as a plain fp32 HF folder (converted on first use)."""
    return materialize(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2(smollm2_folder):
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    return load_tokenizer(smollm2_folder)


@pytest.fixture
def cli():
    """Invoke the CLI in-process: cli('eval', 'x') -> click Result (stdout, stderr split)."""
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, list(args), env=env, catch_exceptions=False)

    return invoke


@pytest.fixture
def tiny_llama(tmp_path, smollm2_folder):
    """A 2-layer random Llama that uses SmolLM2's real tokenizer (so --calib FILE works)."""
    from tests.helpers import tiny_llama_folder

    return tiny_llama_folder(tmp_path / "tiny", smollm2_folder)
