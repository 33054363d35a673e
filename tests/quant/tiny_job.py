"""A tiny synthetic quantisation job, runnable as a script (the resume test kills it)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tests.quant.test_encode import brute_force_encode, tiny_matrix
from transformers import LlamaConfig, LlamaForCausalLM

from liftq_cli.io.quantized import write_quantized
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.blocks import quantize_blocks
from liftq_cli.quantize_job import CorrectionConfig, QuantizeSettings

CFG = LatticeConfig(8, 4)
MATRIX = tiny_matrix(8, 4)
OPTIONS = QuantizeSettings(whiten_steps=5, correction=CorrectionConfig(steps=10, batch=2))
FAST = QuantizeSettings(whiten_steps=0, correction=CorrectionConfig(steps=1, batch=2))


def tiny_config(layers: int, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def make_model(folder: Path, layers: int, hidden: int = 32) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(layers, hidden)).save_pretrained(folder)


def run_job(
    folder: Path,
    work: Path,
    out: Path,
    layers: int,
    delay: float = 0.0,
    options: QuantizeSettings = OPTIONS,
) -> None:
    import time

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    def slow(_report):
        time.sleep(delay)

    quantize_blocks(
        folder,
        lambda *_: CFG,
        ids,
        WorkDir(work),
        lambda _c: MATRIX,
        brute_force_encode,
        options,
        {"job": "tiny"},
        progress=slow,
    )
    write_quantized(folder, WorkDir(work), out, layers, lambda _c: MATRIX, {"job": "tiny"}, "")


if __name__ == "__main__":
    folder, work, out, layers, delay = sys.argv[1:6]
    options = FAST if sys.argv[6:] == ["fast"] else OPTIONS
    run_job(Path(folder), Path(work), Path(out), int(layers), float(delay), options)
