"""`--mixed`: per-linear lattice configs by measured sensitivity, cached in the work dir.

One forward and backward pass of the full-precision model over the first
SENSITIVITY_WINDOWS calibration windows measures each linear's empirical-Fisher sensitivity
(quant/sensitivity.py); the shared allocator (plan/allocation.py) then picks catalog configs
that minimise the predicted loss increase while the packed code bits stay within the target.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from liftq_cli.data.calibration import Calibration
from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import quiet_transformers
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import SENSITIVITY_FILE, WorkDir, fingerprint
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.allocation import allocate
from liftq_cli.quant.events import Progress, SensitivityStep

SENSITIVITY_WINDOWS = 32  # calibration windows for the Fisher pass
SENSITIVITY_VERSION = 1
Shapes = dict[tuple[int, str], tuple[int, int]]


def measure_sensitivity(
    folder: Path,
    calibration: Calibration,
    work: WorkDir,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
) -> dict[tuple[int, str], float]:
    """Fisher sensitivity {(layer, kind): kappa} of every decoder linear, reused from the work
    dir when its fingerprint (model, weights, windows) matches."""
    from transformers import AutoModelForCausalLM

    from liftq_cli.quant.sensitivity import fisher_sensitivity

    windows = calibration.input_ids[:SENSITIVITY_WINDOWS]
    key = fingerprint(
        {
            "model": str(folder),
            "weights": WeightReader(folder).fingerprint(),
            "calibration": calibration.fingerprint,
            "windows": list(windows.shape),
            "version": SENSITIVITY_VERSION,
        }
    )
    cached = work.load_sensitivity(key)
    if cached is not None:
        return cached
    began = time.perf_counter()
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def step(done: int, total: int) -> None:
        if progress is not None:
            progress(SensitivityStep(done, total))

    kappa = fisher_sensitivity(model.to(device), windows.to(device), progress=step)
    del model
    work.save_sensitivity(key, kappa, time.perf_counter() - began)
    return kappa


def allocate_bits(
    kappa: dict[tuple[int, str], float],
    shapes: Shapes,
    config: LatticeConfig,
    mse: dict[LatticeConfig, float],
    windows: int,
    work: WorkDir,
) -> tuple[dict[int, dict[str, LatticeConfig]], dict[str, Any]]:
    """Per-linear configs averaging `config.bits` packed code bits (padding included).

    Returns the overrides {layer: {kind: config}} and a JSON-ready report."""
    missing = set(shapes) - set(kappa)
    if missing:
        raise BadInputError(
            f"sensitivity in {work.path / SENSITIVITY_FILE} lacks {len(missing)} linears: "
            "delete it to measure again"
        )
    result = allocate(shapes, {k: kappa[k] for k in shapes}, mse, config.bits, config)
    layers: dict[int, dict[str, LatticeConfig]] = {}
    for (layer, kind), cfg in sorted(result.configs.items()):
        layers.setdefault(layer, {})[kind] = cfg
    counts = Counter(cfg.name for cfg in result.configs.values())
    report = {
        "method": "fisher",
        "target_bits": config.bits,
        "code_bits": round(result.code_bits, 6),
        "windows": windows,
        "predicted_vs_uniform": round(result.predicted / result.uniform_predicted, 4)
        if result.uniform_predicted
        else None,
        "configs": dict(sorted(counts.items())),
    }
    return layers, report
