"""The typed quantize job: every setting of `liftq quantize`, frozen, in one place.

`QuantizeSettings` is what a recipe's `quantize:` section holds, key for key (nested sections
for calibration, correction and fine-tuning); `QuantizeJob` adds what belongs to one run: the
model, the lattice config and its per-linear overrides, the output and work folders, and the
text of the recipe the run came from. The CLI builds the job and hands it, whole, to
`quant.job.run_job`; nothing downstream takes loose settings.

Every value is checked when the dataclass is built (`BadInputError`, one line naming the
setting, its CLI flag and the fix), so a recipe and a command line fail the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from liftq_cli.errors import BadInputError
from liftq_cli.io.packed_format import ROTATIONS
from liftq_cli.lattice_config import LatticeConfig

Overrides = Mapping[int, Mapping[str, LatticeConfig]]  # {layer: {kind: config}}


def _int(value: Any, name: str, flag: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInputError(f"{name} = {value!r} must be an integer ({flag})")
    if value < low:
        raise BadInputError(f"{flag} {value} is invalid: {name} must be at least {low}")


def _positive(value: Any, name: str, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{name} = {value!r} must be a number ({flag})")
    if not (math.isfinite(value) and value > 0):
        raise BadInputError(f"{flag} {value} is invalid: {name} must be a positive finite number")


def _non_negative(value: Any, name: str, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"{name} = {value!r} must be a number ({flag})")
    if not (math.isfinite(value) and value >= 0):
        raise BadInputError(f"{flag} {value} is invalid: {name} must be a finite number >= 0")


def _bool(value: Any, name: str, flag: str) -> None:
    if not isinstance(value, bool):
        raise BadInputError(f"{name} = {value!r} must be true or false ({flag})")


def _device(value: Any) -> None:
    """auto, cpu, cuda or cuda:N (whether that device exists is checked when the job runs)."""
    ok = isinstance(value, str) and (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    )
    if not ok:
        raise BadInputError(f"--device {value!r} is invalid: pass auto, cpu, cuda or cuda:N")


def _text(value: Any, name: str, flag: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"{name} = {value!r} must name a text: wiki or a file ({flag})")


@dataclass(frozen=True)
class CalibrationSettings:
    """source: `wiki` or a text file (never an evaluation set); nsamples windows of seqlen."""

    source: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512

    def __post_init__(self) -> None:
        _text(self.source, "calibration.source", "--calib")
        _int(self.nsamples, "calibration.nsamples", "--nsamples", 1)
        _int(self.seqlen, "calibration.seqlen", "--seqlen", 2)


# mse: the block output's squared error, every value alike; token: each token's squared error
# relative to its full-precision output's norm (what the next block's RMSNorm passes on).
# On SmolLM2-135M at 2.4 bits token flips bits in every block but ends at WikiText-2 41.50
# against mse's 40.79 (bench/results/quality.md, row liftq-2.4-token): mse stays the default.
CORRECTION_LOSSES = ("mse", "token")


@dataclass(frozen=True)
class CorrectionConfig:
    """Intra-block correction (quant/block_correction.py): at most `steps` Adam steps on the
    code latents (lr_codes) and on the row and whitening scales (lr_scales), peak rates
    decayed on a cosine to 0 over `steps`, `batch` windows a step. Latents start at
    latent_init times each bit's pre-sign value. The last `heldout` calibration windows (at
    most half) are not trained on: every `eval_every` steps the block is measured on them,
    the best state is kept, and `patience` measurements without a gain stop the block.
    `loss` is what is minimised and judged (CORRECTION_LOSSES). `seed` is set per block by
    the block stage (job seed x 1000 + layer)."""

    steps: int = 100
    lr_codes: float = 1e-3
    lr_scales: float = 6e-3
    batch: int = 2
    latent_init: float = 1.0
    heldout: int = 4
    eval_every: int = 20
    patience: int = 2
    loss: str = "mse"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in CORRECTION_LOSSES:
            raise BadInputError(
                f"correction.loss (--correction-loss) {self.loss!r} is unknown: use "
                f"{' or '.join(CORRECTION_LOSSES)}"
            )
        _int(self.steps, "correction.steps", "--correction-steps", 0)
        # 0 freezes that group (bench/correction.py: "scales only")
        _non_negative(self.lr_codes, "correction.lr_codes", "quantize.correction.lr_codes")
        _non_negative(self.lr_scales, "correction.lr_scales", "quantize.correction.lr_scales")
        _int(self.batch, "correction.batch", "quantize.correction.batch", 1)
        _positive(self.latent_init, "correction.latent_init", "quantize.correction.latent_init")
        _int(self.heldout, "correction.heldout", "quantize.correction.heldout", 0)
        _int(self.eval_every, "correction.eval_every", "quantize.correction.eval_every", 1)
        _int(self.patience, "correction.patience", "quantize.correction.patience", 1)
        _int(self.seed, "correction.seed", "--seed", 0)


@dataclass(frozen=True)
class FinetuneConfig:
    """Model-level KD fine-tuning (quant/finetune.py). steps: Adam steps of `batch` windows
    each, every window seen once (0: the stage is off); lr: peak learning rate (cosine decay
    to 0); eval_windows: held-out windows on which the KL is measured before and after (the
    result is kept only if it went down); calib: its text (None: the calibration text).
    `seed` is the job seed (windows are drawn with seed + 1).

    Every step takes fresh windows: on SmolLM2-135M, three passes over 64 windows halved the
    training KL but gained less on held-out text than one pass (the scales over-fit)."""

    steps: int = 0
    lr: float = 1e-3
    batch: int = 4
    eval_windows: int = 8
    seed: int = 0
    calib: str | None = None

    def __post_init__(self) -> None:
        _int(self.steps, "finetune.steps", "--finetune-steps", 0)
        _positive(self.lr, "finetune.lr", "--finetune-lr")
        _int(self.batch, "finetune.batch", "quantize.finetune.batch", 1)
        _int(self.eval_windows, "finetune.eval_windows", "quantize.finetune.eval_windows", 1)
        _int(self.seed, "finetune.seed", "--seed", 0)
        _text(self.calib, "finetune.calib", "--finetune-calib", optional=True)

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the stage's result (the text is fingerprinted through
        its windows)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "calib"}


@dataclass(frozen=True)
class QuantizeSettings:
    """Every stage's settings: a recipe's `quantize:` section, one key per field.

    effort: the preset (EFFORTS) the other values started from, a label; whiten_steps: Adam
    steps on s1, s2; whiten_rotations: fixed (random-sign Hadamard / DCT, the kernels' fast
    path) or trained (Cayley, with s1, s2); search_beam: the encoder's beam (0: each
    config's catalog beam); ldlq: encode with Hessian error feedback; sequential: each block
    sees the quantized-so-far activations (False: full-precision inputs, blocks independent);
    true_sequential: a block's linears are encoded in dataflow stages (q/k/v, o, gate/up,
    down), each measured with the earlier stages quantized (quant/stages.py); compensate:
    each linear is encoded toward the full-precision model's output instead of its own, with
    ridge compensate_damp (quant/compensate.py); mixed: spend the lattice config's bits on
    average, spread over the linears by measured sensitivity.
    """

    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    seed: int = 0
    effort: str = "default"
    whiten_steps: int = 50
    whiten_rotations: str = "fixed"
    search_beam: int = 0
    ldlq: bool = True
    sequential: bool = True
    true_sequential: bool = False
    compensate: bool = False
    compensate_damp: float = 0.1
    mixed: bool = False
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        _int(self.seed, "seed", "--seed", 0)
        if self.effort not in EFFORTS:
            raise BadInputError(
                f"--effort {self.effort!r} is unknown: pass one of {', '.join(EFFORTS)}"
            )
        _int(self.whiten_steps, "whiten_steps", "--whiten-steps", 0)
        if self.whiten_rotations not in ROTATIONS:
            raise BadInputError(
                f"whiten_rotations (--whiten-rotations) {self.whiten_rotations!r} is unknown: "
                f"use {' or '.join(ROTATIONS)}"
            )
        _int(self.search_beam, "search_beam", "quantize.search_beam", 0)
        _bool(self.ldlq, "ldlq", "--ldlq/--no-ldlq")
        _bool(self.sequential, "sequential", "--independent")
        _bool(self.true_sequential, "true_sequential", "--true-sequential/--no-true-sequential")
        _bool(self.compensate, "compensate", "--compensate/--no-compensate")
        _positive(self.compensate_damp, "compensate_damp", "--compensate-damp")
        _bool(self.mixed, "mixed", "--mixed")
        if self.finetune.seed != self.seed:
            raise BadInputError(
                f"finetune.seed {self.finetune.seed} differs from seed {self.seed}: "
                "fine-tuning uses the job seed, set only `seed`"
            )

    def block_options(self) -> dict[str, Any]:
        """The block stage's settings as its fingerprint records them (work-dir `job.json`):
        the same keys as liftq 0.1's `QuantizeOptions`, so older work dirs still resume."""
        options = {
            "seed": self.seed,
            "whiten_steps": self.whiten_steps,
            "sequential": self.sequential,
            "ldlq": self.ldlq,
            "correction": _plain(self.correction),
        }
        if self.whiten_rotations != "fixed":  # only then, so other work dirs keep resuming
            options["whiten_rotations"] = self.whiten_rotations
        if self.search_beam:
            options["search_beam"] = self.search_beam
        # liftq before these settings encoded unstaged, uncompensated: the keys appear only
        # when on, so those work dirs resume exactly when asked for the same
        if self.true_sequential:
            options["true_sequential"] = True
        if self.compensate:
            options["compensate_damp"] = self.compensate_damp
        return options

    @classmethod
    def preset(cls, effort: str, seed: int = 0) -> QuantizeSettings:
        """The settings of an effort preset (EFFORTS), with the job seed."""
        if effort not in EFFORTS:
            raise BadInputError(f"--effort {effort!r} is unknown: pass one of {', '.join(EFFORTS)}")
        return settings_from_dict({"effort": effort, "seed": seed})

    def to_dict(self) -> dict[str, Any]:
        """YAML-ready values; derived seeds (correction.seed, finetune.seed) are left out."""
        data = _plain(self)
        data["correction"].pop("seed")
        data["finetune"].pop("seed")
        return data


def _plain(obj: Any) -> dict[str, Any]:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = _plain(value) if hasattr(value, "__dataclass_fields__") else value
    return out


# What --effort (a recipe's quantize.effort) starts from; any other key or flag overrides it.
# default is sized for 2 CPU cores (SmolLM2-135M at 2.4 bits: block stage within 1.5x of
# the 50-step correction's time), fast for a first look, best for a GPU: 4x the
# calibration tokens, a 4x encoder beam, 5x the correction steps with more held out, and
# 256 fine-tuning steps.
EFFORTS: dict[str, dict[str, Any]] = {
    "fast": {
        "calibration": {"nsamples": 32},
        "whiten_steps": 25,
        "correction": {"steps": 40, "eval_every": 10, "heldout": 2},
    },
    "default": {},
    "best": {
        "calibration": {"nsamples": 256},
        "whiten_steps": 200,
        "search_beam": 256,
        "correction": {"steps": 500, "eval_every": 25, "patience": 4, "heldout": 16},
        "finetune": {"steps": 256},
    },
}

_SECTIONS = {"calibration": CalibrationSettings, "correction": CorrectionConfig}
_SECTIONS["finetune"] = FinetuneConfig
_DERIVED = {"correction": ("seed",), "finetune": ("seed",)}


def _section(cls: type, data: Any, where: str, derived: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise BadInputError(f"{where} must be a mapping, got {data!r}")
    allowed = [f.name for f in fields(cls) if f.name not in derived]
    unknown = [str(key) for key in data if key not in allowed]
    if unknown:
        raise BadInputError(
            f"{where} has unknown key(s) {', '.join(unknown)}: allowed are {', '.join(allowed)}"
        )
    return dict(data)


def settings_from_dict(data: Any, source: str = "recipe") -> QuantizeSettings:
    """Validate a recipe's `quantize:` mapping (missing keys take their defaults)."""
    where = f"{source}: quantize"
    top = _section(QuantizeSettings, data, where)
    effort = top.get("effort", "default")
    if not isinstance(effort, str) or effort not in EFFORTS:
        raise BadInputError(f"{where}: effort {effort!r} is unknown: use {', '.join(EFFORTS)}")
    for key, value in EFFORTS[effort].items():  # the preset under the keys given
        if isinstance(value, dict):
            given = top.get(key, {})
            if isinstance(given, Mapping):
                top[key] = {**value, **given}
        else:
            top.setdefault(key, value)
    seed = top.get("seed", 0)
    try:
        _int(seed, "seed", "--seed", 0)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    for name, cls in _SECTIONS.items():
        if name in top:
            values = _section(cls, top[name], f"{where}.{name}", _DERIVED.get(name, ()))
            if name == "finetune":
                values["seed"] = seed
            try:
                top[name] = cls(**values)
            except BadInputError as exc:
                raise BadInputError(f"{where}.{name}: {exc}") from None
        elif name == "finetune":
            top[name] = FinetuneConfig(seed=seed)
    try:
        return QuantizeSettings(**top)
    except BadInputError as exc:
        raise BadInputError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class QuantizeJob:
    """One run of `liftq quantize`.

    model: alias, HF folder, .gguf or hub id; out: the output folder; lattice: the config of
    every quantized linear except those in `layers` ({layer: {kind: config}}, kind q_proj, ...,
    down_proj); work_dir: resumable work folder (None: `.OUT.work` beside `out`); recipe: the
    YAML text of the recipe the run was built from, if any (its plan fields and model are
    carried into the output's recipe and checked against the model); overwrite: replace a
    previous quantize output at `out` (anything else there is always refused).
    """

    model: str
    out: Path
    lattice: LatticeConfig
    layers: Overrides = field(default_factory=dict)
    settings: QuantizeSettings = field(default_factory=QuantizeSettings)
    work_dir: Path | None = None
    recipe: str | None = None
    overwrite: bool = False  # replace a previous `liftq quantize` output at `out`
    device: str = "auto"
    tf32: bool = True

    def __post_init__(self) -> None:
        _device(self.device)
        _bool(self.tf32, "tf32", "--tf32/--no-tf32")
        if self.settings.mixed and self.layers:
            overridden = sum(len(v) for v in self.layers.values())
            raise BadInputError(
                "--mixed chooses every linear's config itself, but the recipe already overrides "
                f"{overridden} linears: drop --mixed or use a uniform recipe"
            )

    @property
    def work(self) -> Path:
        """The work directory this job resumes from."""
        return self.work_dir or self.out.with_name(f".{self.out.name}.work")

    def config_for(self, layer: int, kind: str) -> LatticeConfig:
        """The lattice config of linear `kind` in block `layer`."""
        return self.layers.get(layer, {}).get(kind, self.lattice)
