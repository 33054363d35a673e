"""Typed progress events of a quantize job, and the per-block report.

The job calls `progress(event)` with one of these; the CLI prints a log line, draws a bar, or
writes `event.as_json()` as one JSON line (`liftq quantize --json`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BlockReport:
    """One finished decoder block: errors before and after correction, and where time went."""

    layer: int
    proxy_error: float  # mean whitening proxy error of its linears
    mse_before: float  # block output MSE after encoding, before correction
    mse_after: float  # ... after correction
    flipped: float  # fraction of code bits correction changed
    seconds: float
    seconds_whiten: float = 0.0
    seconds_encode: float = 0.0
    seconds_correct: float = 0.0
    unrouted: int = 0  # experts no calibration token reached: calibrated on all tokens
    correction_steps: int = 0  # the correction step whose state was kept (0: none helped)
    heldout_before: float = 0.0  # block output MSE on the held-out windows (0.0: none)
    heldout_after: float = 0.0


@dataclass(frozen=True)
class SensitivityStep:
    """A batch of the Fisher pass of `--mixed` is done."""

    step: int
    steps: int

    def as_json(self) -> dict[str, Any]:
        return {"event": "sensitivity", "step": self.step, "steps": self.steps}


@dataclass(frozen=True)
class BlockDone:
    """Block `report.layer` (0-based) of `layers` is quantized and saved to the work dir."""

    report: BlockReport
    layers: int

    def as_json(self) -> dict[str, Any]:
        return {"event": "block", **asdict(self.report), "layers": self.layers}


@dataclass(frozen=True)
class FinetuneStep:
    """Fine-tuning step `step` of `steps` is done; `kl` is its training KL (nats/token)."""

    step: int
    steps: int
    kl: float

    def as_json(self) -> dict[str, Any]:
        return {"event": "finetune", "step": self.step, "steps": self.steps, "kl": self.kl}


@dataclass(frozen=True)
class PreflightReady:
    """The job's needs against this machine (quant/preflight.py), before any work: `line`
    sums it up, `plan` is its JSON form."""

    line: str
    plan: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"event": "preflight", **self.plan}


Event = SensitivityStep | BlockDone | FinetuneStep | PreflightReady
Progress = Callable[[Event], None]
