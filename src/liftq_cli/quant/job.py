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

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from liftq_cli.data.calibration import Calibration, calibration_set
from liftq_cli.data.text import EVAL_SETS, load_text
from liftq_cli.errors import BadInputError, LiftqError, ResourceError
from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve
from liftq_cli.io.outputs import check_output, check_work_dir, existing
from liftq_cli.io.quantized import write_quantized
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.plan.architectures import Architecture, from_hf_config, resolve_architecture
from liftq_cli.quant import preflight
from liftq_cli.quant.blocks import build_skeleton, quantize_blocks
from liftq_cli.quant.decoder import check_supported, checkpoint_reader
from liftq_cli.quant.device import precision, resolve_device
from liftq_cli.quant.events import PreflightReady, Progress
from liftq_cli.quant.experts import expert_layouts
from liftq_cli.quant.finetune_stage import finetune_stage, finetune_windows
from liftq_cli.quant.linear_shapes import Shapes, average_bits, check_overrides, linear_shapes
from liftq_cli.quant.mixed import SENSITIVITY_WINDOWS, allocate_bits, measure_sensitivity
from liftq_cli.quant.parallel import SOLO, Ranks, join, leave, world_from_env
from liftq_cli.quantize_job import QuantizeJob
from liftq_cli.recipe import check_model, dumps, for_job, loads

BITS_TOLERANCE = 0.05


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


def check_outputs(job: QuantizeJob) -> None:
    """Refuse an --out or --work-dir that would destroy data or cannot be written, before
    any work starts (io/outputs.py)."""
    settings = job.settings
    inputs = existing((job.model, settings.calibration.source, settings.finetune.calib))
    check_output(job.out, "--out", "quantize", inputs, job.overwrite)
    check_work_dir(job.work, job.out, inputs)


@dataclass(frozen=True)
class Resolved:
    """What the resolve stage found: the model folder and config, its decoder linears'
    shapes, and the calibration (and fine-tuning) windows."""

    folder: Path
    hf_config: Any
    shapes: Shapes
    calibration: Calibration
    tuning: Calibration | None
    device: torch.device
    arch: Architecture
    dtype_bytes: int  # of the checkpoint's tensors


def run_job(job: QuantizeJob, progress: Progress | None = None) -> QuantizeResult | None:
    """Quantise `job.model` into `job.out` (see the module docstring).

    Under torchrun (or `liftq quantize --nproc N`) every rank runs this; the root (rank 0)
    owns the work dir and the output and returns the result, the others take part in the
    block stage and return None."""
    _, _, local_rank = world_from_env()
    device = resolve_device(job.device, local_rank)  # a missing GPU fails before any work
    ranks = join(device)
    try:
        error, resolved = None, None
        try:
            resolved = resolve_job(job, device, check=ranks.root)
            if ranks.root:
                pre = preflight.plan(
                    job, resolved.arch, ranks.world, dtype_bytes=resolved.dtype_bytes
                )
                if progress is not None:
                    progress(PreflightReady(preflight.summary(pre), preflight.as_json(pre)))
                preflight.check(pre)
        except LiftqError as refused:
            error = refused
        ranks.agree(error)  # a refusal on one rank fails every rank, before any work
        assert resolved is not None
        if not ranks.root:
            quantize_resolved(job, resolved, None, None, ranks)
            return None
        work = WorkDir(job.work)
        with work.lock():
            return quantize_resolved(job, resolved, work, progress, ranks)
    except RuntimeError as lost:  # gloo/NCCL: a peer died or hung past the timeout
        if ranks.world == 1:
            raise
        first = (str(lost).strip().splitlines() or [type(lost).__name__])[0][:200]
        raise ResourceError(
            f"rank {ranks.rank} of {ranks.world} lost the other ranks ({first}): the work dir "
            f"'{job.work}' keeps every finished block; rerun the same command to resume"
        ) from None
    finally:
        leave()


def resolve_job(
    job: QuantizeJob, device: torch.device | None = None, check: bool = True
) -> Resolved:
    """Every check that can fail, before any work dir is made or any block quantized
    (`check`: the outputs too; only the rank that writes them checks)."""
    from liftq_cli.quant.lattice_catalog import load_catalog_matrix

    settings = job.settings
    calib = settings.calibration
    if check:
        check_outputs(job)
    device = resolve_device(job.device) if device is None else device
    for cfg in {job.lattice, *(c for kinds in job.layers.values() for c in kinds.values())}:
        load_catalog_matrix(cfg)  # an unknown lattice fails here
    folder = materialize(resolve(job.model))
    hf_config, skeleton = build_skeleton(folder)  # refuses unsupported architectures early
    WeightReader(folder)  # a missing, truncated or corrupt weights file fails here
    arch = from_hf_config(hf_config.to_dict(), folder.name, str(folder / "config.json"))
    if job.recipe is not None:
        check_model(loads(job.recipe, "--recipe"), job.model, arch, "--recipe")
    shapes = linear_shapes(skeleton)
    check_overrides(job.layers, shapes)
    if settings.mixed and expert_layouts(skeleton):
        raise BadInputError(
            f"--mixed: '{hf_config.model_type}' has experts, and the sensitivity pass does not "
            "measure them one by one yet: quantize it at one width (drop --mixed)"
        )
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
    return Resolved(
        folder,
        hf_config,
        shapes,
        calibration,
        tuning,
        device,
        arch,
        _dtype_bytes(hf_config.to_dict()),
    )


def _dtype_bytes(config: dict[str, Any]) -> int:
    """Bytes per element of the checkpoint's tensors, from its config.json fields (`dtype`,
    or the older `torch_dtype`; default bf16)."""
    dtype = config.get("dtype") or config.get("torch_dtype")
    return 4 if str(dtype).removeprefix("torch.") == "float32" else 2


def dry_run(job: QuantizeJob, world: int = 1) -> preflight.Preflight:
    """`liftq quantize --dry-run`: the preflight of `job` on `world` processes, from the
    model's config alone (a preset such as llama-70b needs no weights), with the outputs and
    the device checked as a real run would; nothing is written."""
    check_outputs(job)
    resolve_device(job.device)
    spec = job.model
    if Path(spec).suffix == ".gguf":  # its config is inside: the converted folder has one
        spec = str(materialize(resolve(spec)))
    arch = resolve_architecture(spec)
    config = Path(spec) / "config.json"
    fields = json.loads(config.read_text()) if config.is_file() else {}
    check_supported(Path(spec) if config.is_file() else None)  # as a real run would
    return preflight.plan(job, arch, world, dtype_bytes=_dtype_bytes(fields))


def quantize_resolved(
    job: QuantizeJob,
    resolved: Resolved,
    work: WorkDir | None,
    progress: Progress | None = None,
    ranks: Ranks = SOLO,
) -> QuantizeResult | None:
    """allocate -> blocks -> fine-tune -> write, holding the work dir, on the job's device
    under its precision policy (quant/device.py). Only the root has a work dir; the other
    ranks return None after the block stage."""
    with precision(resolved.device, job.tf32):
        return _quantize_resolved(job, resolved, work, progress, ranks)


def _quantize_resolved(
    job: QuantizeJob,
    resolved: Resolved,
    work: WorkDir | None,
    progress: Progress | None,
    ranks: Ranks,
) -> QuantizeResult | None:
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
    if settings.mixed and ranks.root:  # the other ranks wait for the allocation
        kappa = measure_sensitivity(folder, calibration, work, progress, resolved.device)
        windows = min(SENSITIVITY_WINDOWS, calib.nsamples)
        layers, allocation = allocate_bits(kappa, shapes, job.lattice, catalog_mse(), windows, work)
    layers = ranks.broadcast_object(layers)

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
        functools.partial(catalog_encode, beam=settings.search_beam),
        settings,
        identity,
        progress,
        resolved.device,
        ranks,
    )
    if not ranks.root:
        return None
    assert work is not None
    # -- fine-tune
    tuned, tuned_report = None, None
    if tuning is not None:
        tuned, tuned_report = finetune_stage(
            folder, work, tuning, settings.finetune, load_catalog_matrix, progress, resolved.device
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
        "device": {"type": resolved.device.type, "tf32": job.tf32},
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
        checkpoint_reader(folder),
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
