"""`liftq quantize` as one library call, in the order the data flows:

    resolve   the model folder, its architecture, the lattice matrices, calibration windows
    allocate  per-linear configs (--mixed: by measured sensitivity; else the recipe's)
    blocks    whiten, encode, correct, one decoder block at a time (quant/blocks.py)
    fine-tune optional model-level KD on the finished blocks (quant/finetune.py)
    write     the compact output folder (io/quantized.py) with the recipe that reproduces it

Everything comes from one `QuantizeJob`; every stage's result is kept in the work dir
(io/workdir.py), so an interrupted job resumes and a finished stage is reused.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from liftq_cli.data.calibration import Calibration, calibration_set, tokenize
from liftq_cli.data.text import EVAL_SETS, Text, load_text
from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import load_tokenizer, materialize, quiet_transformers, resolve
from liftq_cli.io.outputs import check_output, overlap, resolve_path
from liftq_cli.io.quantized import write_quantized
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import WorkDir, fingerprint
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.plan.architectures import from_hf_config
from liftq_cli.quant.blocks import build_skeleton, quantize_blocks
from liftq_cli.quant.events import FinetuneStep, Progress
from liftq_cli.quant.finetune import attach, finetune, tuned_tensors
from liftq_cli.quant.mixed import SENSITIVITY_WINDOWS, allocate_bits, measure_sensitivity
from liftq_cli.quant.reconstruct import QuantizedLinear
from liftq_cli.quantize_job import FinetuneConfig, QuantizeJob
from liftq_cli.recipe import check_model, dumps, for_job, loads

BITS_TOLERANCE = 0.05
Shapes = dict[tuple[int, str], tuple[int, int]]


@dataclass
class QuantizeResult:
    """What a finished job wrote and measured (`as_json` is the `--json` summary)."""

    model: str
    out: Path
    config: str
    bits: float  # code bits per weight over the decoder linears
    mixed: bool  # more than one config (overrides or --mixed)
    layers: int
    seconds: float
    files: dict[str, int]
    work_dir: Path
    blocks: list[dict[str, Any]]
    finetune: dict[str, Any] | None
    allocation: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def config_for_bits(bits: float) -> LatticeConfig:
    """The catalog config nearest to `bits`; on ties, the one with the lowest Gaussian MSE
    (2.0 bits is LQ-32/16, 3.0 bits LQ-30/10)."""
    from liftq_cli.quant.lattice_catalog import catalog_mse

    low, high = CATALOG_CONFIGS[0].bits, CATALOG_CONFIGS[-1].bits
    if not math.isfinite(bits):
        raise BadInputError(
            f"--bits {bits} is not a number: pass a bit-width from {low:.1f} to {high:.1f}"
        )
    mse = catalog_mse()
    best = min(CATALOG_CONFIGS, key=lambda c: (round(abs(c.bits - bits), 6), mse.get(c, 1.0)))
    if abs(best.bits - bits) > BITS_TOLERANCE:
        raise BadInputError(
            f"--bits {bits} has no lattice config within {BITS_TOLERANCE} bits (the catalog spans "
            f"{low:.1f} to {high:.1f} bits, see `liftq lattice list`): pick one of those or pass "
            "--config LQ-D/d"
        )
    return best


def _local(spec: str | None) -> Path | None:
    """`spec` as a path when it names an existing file or folder (an input to protect)."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return path if path.exists() else None


def check_outputs(job: QuantizeJob) -> None:
    """Refuse an --out or --work-dir that would destroy data or cannot be written, before
    any work starts (io/outputs.py)."""
    settings = job.settings
    inputs = [_local(job.model), _local(settings.calibration.source)]
    inputs.append(_local(settings.finetune.calib))
    check_output(job.out, "--out", "quantize", inputs, job.overwrite)
    relation = overlap(resolve_path(job.work), resolve_path(job.out))
    if relation:  # writing --out would replace the work dir, or the reverse
        raise BadInputError(
            f"--work-dir '{job.work}' {relation} --out '{job.out}': keep them apart (the default "
            f"work dir is .NAME.work beside --out)"
        )
    # a work dir of this or an earlier job is resumed, never replaced
    check_output(job.work, "--work-dir", "work", inputs, overwrite=True)


@dataclass(frozen=True)
class Resolved:
    """What the resolve stage found: the model folder and config, its decoder linears'
    shapes, and the calibration (and fine-tuning) windows."""

    folder: Path
    hf_config: Any
    shapes: Shapes
    calibration: Calibration
    tuning: Calibration | None


def run_job(job: QuantizeJob, progress: Progress | None = None) -> QuantizeResult:
    """Quantise `job.model` into `job.out` (see the module docstring)."""
    resolved = resolve_job(job)
    work = WorkDir(job.work)
    with work.lock():
        return quantize_resolved(job, resolved, work, progress)


def resolve_job(job: QuantizeJob) -> Resolved:
    """Every check that can fail, before any work dir is made or any block quantized."""
    from liftq_cli.quant.lattice_catalog import load_catalog_matrix

    settings = job.settings
    calib = settings.calibration
    check_outputs(job)
    for cfg in {job.lattice, *(c for kinds in job.layers.values() for c in kinds.values())}:
        load_catalog_matrix(cfg)  # an unknown lattice fails here
    folder = materialize(resolve(job.model))
    hf_config, skeleton = build_skeleton(folder)  # refuses unsupported architectures early
    WeightReader(folder)  # a missing, truncated or corrupt weights file fails here
    if job.recipe is not None:
        arch = from_hf_config(hf_config.to_dict(), folder.name, str(folder / "config.json"))
        check_model(loads(job.recipe, "--recipe"), job.model, arch, "--recipe")
    shapes = linear_shapes(skeleton)
    check_overrides(job.layers, shapes)
    for option, source in (
        ("--calib", calib.source),
        ("--finetune-calib", settings.finetune.calib),
    ):
        if source in EVAL_SETS:  # refused by name, before any text is read
            raise BadInputError(
                f"{option} {source}: '{source}' is an evaluation set and cannot be used for "
                f"calibration: use wiki or a text file of your own"
            )
    text = load_text(calib.source)
    tokenizer = load_tokenizer(folder)
    calibration = calibration_set(text, tokenizer, calib.nsamples, calib.seqlen, settings.seed)
    top = int(calibration.input_ids.max())
    if top >= hf_config.vocab_size:
        raise BadInputError(
            f"the tokenizer in '{folder}' yields token id {top} but the model's vocabulary has "
            f"{hf_config.vocab_size} entries: its tokenizer files belong to another model"
        )
    tuning = None
    if settings.finetune.steps:  # checked before the block stage: a short text fails fast
        tuning_text = load_text(settings.finetune.calib) if settings.finetune.calib else text
        tuning = finetune_windows(tuning_text, tokenizer, calib.seqlen, settings.finetune)
    return Resolved(folder, hf_config, shapes, calibration, tuning)


def quantize_resolved(
    job: QuantizeJob, resolved: Resolved, work: WorkDir, progress: Progress | None = None
) -> QuantizeResult:
    """allocate -> blocks -> fine-tune -> write, holding the work dir."""
    from liftq_cli.quant.lattice_catalog import catalog_encode, catalog_mse, load_catalog_matrix

    settings = job.settings
    calib = settings.calibration
    folder, shapes, calibration, tuning = (
        resolved.folder,
        resolved.shapes,
        resolved.calibration,
        resolved.tuning,
    )
    # -- allocate
    layers = {k: dict(v) for k, v in job.layers.items()}
    allocation = None
    if settings.mixed:
        kappa = measure_sensitivity(folder, calibration, work, progress)
        windows = min(SENSITIVITY_WINDOWS, calib.nsamples)
        layers, allocation = allocate_bits(kappa, shapes, job.lattice, catalog_mse(), windows, work)

    def config_for(layer: int, kind: str) -> LatticeConfig:
        return layers.get(layer, {}).get(kind, job.lattice)

    bits = average_bits(shapes, config_for)
    # -- blocks
    identity = {
        "model": str(folder),
        "config": (folder / "config.json").read_text(),
        "lattice": job.lattice.name,
        "calibration": calibration.fingerprint,
        "nsamples": calib.nsamples,
        "seqlen": calib.seqlen,
    }
    if layers:  # only mixed jobs carry the key, so uniform work dirs keep resuming
        identity["layers"] = {
            str(k): {n: c.name for n, c in sorted(v.items())} for k, v in sorted(layers.items())
        }
    began = time.perf_counter()
    reports = quantize_blocks(
        folder,
        config_for,
        calibration.input_ids,
        work,
        load_catalog_matrix,
        catalog_encode,
        settings,
        identity,
        progress,
    )
    # -- fine-tune
    tuned, tuned_report = None, None
    if tuning is not None:
        tuned, tuned_report = finetune_stage(
            folder, work, tuning, settings.finetune, load_catalog_matrix, progress
        )
        tuned_report["calibration"] = {
            "source": settings.finetune.calib or calib.source,
            "windows": int(tuning.input_ids.shape[0]),
            "seed": tuning.seed,
            "fingerprint": tuning.fingerprint,
        }
    # -- write
    recipe_text = dumps(for_job(job))
    manifest = {
        "model": job.model,
        "lattice": job.lattice.name,
        "bits": bits,
        "mixed": bool(layers),
        "calibration": {
            "source": calib.source,
            "nsamples": calib.nsamples,
            "seqlen": calib.seqlen,
            "seed": settings.seed,
            "fingerprint": calibration.fingerprint,
        },
        "options": {**settings.block_options(), "finetune": asdict(settings.finetune)},
        "recipe": recipe_text,
        "blocks": [asdict(r) for r in reports],
        "finetune": tuned_report,
        "allocation": allocation,
    }
    files = write_quantized(
        folder,
        work,
        job.out,
        resolved.hf_config.num_hidden_layers,
        load_catalog_matrix,
        manifest,
        recipe_text,
        tuned,
    )
    return QuantizeResult(
        model=job.model,
        out=job.out,
        config=job.lattice.name,
        bits=bits,
        mixed=bool(layers),
        layers=len(reports),
        seconds=round(time.perf_counter() - began, 2),
        files=files,
        work_dir=work.path,
        blocks=[asdict(r) for r in reports],
        finetune=tuned_report,
        allocation=allocation,
    )


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
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    quantized = {
        f"model.layers.{layer}.{name}": QuantizedLinear.from_state(state, cfg, matrices(cfg))
        for layer in range(student.config.num_hidden_layers)
        for name, (cfg, state) in work.load_block(layer).items()
    }
    tuned = attach(student, quantized)

    def step(done: int, total: int, loss: float) -> None:
        if progress is not None:
            progress(FinetuneStep(done, total, loss))

    train = windows.input_ids[: config.steps * config.batch]
    probe = windows.input_ids[config.steps * config.batch :]
    result = finetune(student, teacher, tuned, train, probe, config, step)
    tensors = tuned_tensors(student, tuned)
    report = {k: v for k, v in asdict(result).items() if k != "losses"}
    report["kl_first_last"] = [result.losses[0], result.losses[-1]] if result.losses else []
    work.save_finetune(key, tensors, report)
    return tensors, report


def linear_shapes(skeleton) -> Shapes:
    """(layer, kind) -> (out, in) of every decoder linear, read off the meta-device model."""
    from liftq_cli.quant.sensitivity import decoder_linears

    return {key: (m.out_features, m.in_features) for key, m in decoder_linears(skeleton).items()}


def check_overrides(layers, shapes: Shapes) -> None:
    """Refuse per-layer overrides that name a block or linear this model does not have."""
    count = 1 + max((layer for layer, _ in shapes), default=-1)
    kinds = sorted({kind for _, kind in shapes})
    for layer, overrides in sorted(layers.items()):
        if layer >= count:
            raise BadInputError(
                f"recipe overrides layer {layer} but the model has {count} layers (0 to "
                f"{count - 1}): re-run `liftq plan --write-recipe` for this model"
            )
        for kind in overrides:
            if (layer, kind) not in shapes:
                raise BadInputError(
                    f"recipe overrides layers.{layer}.{kind} but this model's linears are "
                    f"{', '.join(kinds)}: re-run `liftq plan --write-recipe` for this model"
                )


def average_bits(shapes: Shapes, config_for: Callable[[int, str], LatticeConfig]) -> float:
    """Code bits per weight over all decoder linears (D/d weighted by each linear's size)."""
    total = sum(o * i for o, i in shapes.values())
    bits = sum(o * i * config_for(*key).bits for key, (o, i) in shapes.items()) / max(total, 1)
    return round(bits, 6)
