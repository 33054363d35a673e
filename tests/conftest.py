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
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder / name, folder / name)
    return folder
