"""The fine-tuning stage of a quantize job: its windows, and the run (or its cached result)
over the finished blocks of the work dir (quant/finetune.py trains; this feeds it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from liftq_cli.data.calibration import Calibration, calibration_set, tokenize
from liftq_cli.data.text import Text
from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import quiet_transformers
from liftq_cli.io.workdir import WorkDir, fingerprint
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.events import FinetuneStep, Progress
from liftq_cli.quant.experts import unfuse_loaded
from liftq_cli.quant.finetune import attach, finetune, tuned_tensors
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quantize_job import FinetuneConfig


def finetune_windows(text: Text, tokenizer, seqlen: int, config: FinetuneConfig) -> Calibration:
    """steps x batch training windows then eval_windows held-out ones, disjoint, drawn with
    seed + 1 from `text` (refused when it is too short to give every step fresh windows)."""
    need = config.steps * config.batch + config.eval_windows
    tokens = tokenize(tokenizer, text.text).numel()
    if tokens // seqlen < need:
        raise BadInputError(
            f"fine-tuning text '{text.origin}' has {tokens} tokens, fewer than (--finetune-steps "
            f"{config.steps} x {config.batch} + {config.eval_windows} held out) x --seqlen "
            f"{seqlen} = {need * seqlen}: pass a longer --finetune-calib or fewer steps"
        )
    return calibration_set(text, tokenizer, need, seqlen, config.seed + 1)


def finetune_stage(
    folder: Path,
    work: WorkDir,
    windows: Calibration,
    config: FinetuneConfig,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run (or reuse from the work dir) model-level fine-tuning over the finished blocks.

    Returns the tuned tensors by checkpoint name and a JSON-ready report. The result is saved
    under a fingerprint of the block job and `config`, so a resume after it finished skips
    it; an interrupted one starts over (it is deterministic).
    """
    from transformers import AutoModelForCausalLM

    key = fingerprint(
        {
            "job": work.job_fingerprint(),
            "finetune": config.fingerprint(),
            "windows": windows.fingerprint,
        }
    )
    cached = work.load_finetune(key)
    if cached is not None:
        return cached
    with quiet_transformers():
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for model in (teacher, student):  # the block stage's names: one linear per expert matrix
        unfuse_loaded(model, model.config.hidden_size)
    teacher, student = teacher.to(device).eval(), student.to(device).eval()

    def on_device(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in state.items()}

    quantized = {
        f"model.layers.{layer}.{name}": QuantizedLinear.from_state(
            on_device(state), cfg, matrices(cfg).to(device)
        )
        for layer in range(student.config.num_hidden_layers)
        for name, (cfg, state) in work.load_block(layer).items()
    }
    tuned = attach(student, quantized)

    def step(done: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(FinetuneStep(done, total, loss))

    ids = windows.input_ids.to(device)
    train, probe = ids[: config.steps * config.batch], ids[config.steps * config.batch :]
    result = finetune(student, teacher, tuned, train, probe, config, step)
    tensors = tuned_tensors(student, tuned)
    report = {k: v for k, v in asdict(result).items() if k != "losses"}
    report["kl_first_last"] = [result.losses[0], result.losses[-1]] if result.losses else []
    work.save_finetune(key, tensors, report)
    return tensors, report
