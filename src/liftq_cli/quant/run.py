"""`liftq quantize` as one library call: resolve inputs, quantise block by block, optionally
fine-tune the whole model (quant/finetune.py), write out."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from liftq_cli.data.calibration import Calibration, calibration_set, tokenize
from liftq_cli.data.text import load_text
from liftq_cli.errors import BadInputError
from liftq_cli.io.checkpoints import load_tokenizer, materialize, quiet_transformers, resolve
from liftq_cli.io.quantized import write_quantized
from liftq_cli.io.weights import WeightReader
from liftq_cli.quant.configs import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.quant.finetune import FinetuneConfig, attach, finetune, tuned_tensors
from liftq_cli.quant.pipeline import (
    QuantizeOptions,
    build_skeleton,
    quantize_blocks,
)

BITS_TOLERANCE = 0.05
SENSITIVITY_WINDOWS = 32  # calibration windows for the Fisher pass of --mixed
SENSITIVITY_VERSION = 1


def config_for_bits(bits: float) -> LatticeConfig:
    """The catalog config nearest to `bits`; on ties, the one with the lowest Gaussian MSE
    (2.0 bits is LQ-32/16, 3.0 bits LQ-30/10)."""
    from liftq_cli.quant.lattice_catalog import catalog_mse

    mse = catalog_mse()
    best = min(CATALOG_CONFIGS, key=lambda c: (round(abs(c.bits - bits), 6), mse.get(c, 1.0)))
    if abs(best.bits - bits) > BITS_TOLERANCE:
        low, high = CATALOG_CONFIGS[0].bits, CATALOG_CONFIGS[-1].bits
        raise BadInputError(
            f"--bits {bits} has no lattice config within {BITS_TOLERANCE} bits (the catalog spans "
            f"{low:.1f} to {high:.1f} bits, see `liftq lattice list`): pick one of those or pass "
            "--config LQ-D/d"
        )
    return best


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be created, before any work starts (missing parent folders
    are fine: they are made, so the nearest existing ancestor must be writable)."""
    probe_dir = out.expanduser().resolve().parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir() or not os.access(probe_dir, os.W_OK):
        raise BadInputError(f"--out '{out}' cannot be written: choose a writable location")
    try:
        tempfile.TemporaryFile(dir=probe_dir).close()
    except OSError as exc:
        raise BadInputError(f"--out '{out}' cannot be written ({exc.strerror})") from exc


def quantize(
    model: str,
    out: Path,
    config: LatticeConfig,
    calib: str = "wiki",
    nsamples: int = 64,
    seqlen: int = 512,
    work_dir: Path | None = None,
    options: QuantizeOptions | None = None,
    recipe_text: str | None = None,
    progress: Callable[[dict], None] | None = None,
    layers: dict[int, dict[str, LatticeConfig]] | None = None,
    finetune: FinetuneConfig | None = None,
    finetune_calib: str | None = None,
    mixed: bool = False,
) -> dict:
    """Quantise `model` with lattice `config` into `out`; returns a JSON-ready summary.

    layers: per-linear overrides of a mixed recipe, {layer: {kind: config}} (kind: q_proj,
    ..., down_proj); every other linear uses `config`.
    finetune: the optional model-level stage after the blocks (quant/finetune.py); its
    settings are not part of the block stage's fingerprint, so a finished block stage is
    reused when only they change. finetune_calib: its text (default: `calib`), from which
    steps x batch + eval_windows fresh windows are drawn (seed + 1).
    mixed: spend `config.bits` on average (packed code bits, padding included) but give every
    linear its own catalog config by measured sensitivity (`allocate_bits`); the choice becomes
    the job's per-linear overrides, so resume and output work as for a mixed recipe.
    """
    from liftq_cli.quant.lattice_catalog import catalog_encode, load_catalog_matrix

    options = options or QuantizeOptions()
    finetune = finetune or FinetuneConfig()
    layers = layers or {}
    check_writable(out)
    for cfg in {config, *(c for kinds in layers.values() for c in kinds.values())}:
        load_catalog_matrix(cfg)  # an unknown lattice fails before any work dir is made
    folder = materialize(resolve(model))
    hf_config, skeleton = build_skeleton(folder)  # refuses unsupported architectures early
    shapes = linear_shapes(skeleton)
    check_overrides(layers, shapes)
    if mixed and layers:
        raise BadInputError(
            "--mixed chooses every linear's config itself, but the recipe already overrides "
            f"{sum(len(v) for v in layers.values())} linears: drop --mixed or use a uniform recipe"
        )

    def config_for(layer: int, kind: str) -> LatticeConfig:
        return layers.get(layer, {}).get(kind, config)

    text = load_text(calib)
    tokenizer = load_tokenizer(folder)
    calibration = calibration_set(text, tokenizer, nsamples, seqlen, options.seed)
    work_dir = work_dir or out.with_name(f".{out.name}.work")
    allocation = None
    if mixed:
        layers, allocation = allocate_bits(folder, shapes, config, calibration, work_dir, progress)
    bits = average_bits(shapes, config_for)
    tuning = None
    if finetune.steps:  # checked before the block stage: a short text fails fast
        tuning_text = load_text(finetune_calib) if finetune_calib else text
        tuning = finetune_windows(tuning_text, tokenizer, seqlen, finetune)
    settings = {
        "model": str(folder),
        "config": (folder / "config.json").read_text(),
        "lattice": config.name,
        "calibration": calibration.fingerprint,
        "nsamples": nsamples,
        "seqlen": seqlen,
    }
    if layers:  # only mixed jobs carry the key, so uniform work dirs keep resuming
        settings["layers"] = {
            str(k): {n: c.name for n, c in sorted(v.items())} for k, v in sorted(layers.items())
        }
    began = time.perf_counter()
    reports = quantize_blocks(
        folder,
        config_for,
        calibration.input_ids,
        work_dir,
        load_catalog_matrix,
        catalog_encode,
        options,
        settings,
        progress,
    )
    tuned, tuned_report = None, None
    if tuning is not None:
        tuned, tuned_report = finetune_stage(folder, work_dir, tuning, finetune, progress)
        tuned_report["calibration"] = {
            "source": finetune_calib or calib,
            "windows": int(tuning.input_ids.shape[0]),
            "seed": tuning.seed,
            "fingerprint": tuning.fingerprint,
        }
    metadata = {
        "model": model,
        "lattice": config.name,
        "bits": bits,
        "mixed": bool(layers),
        "calibration": {
            "source": calib,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "seed": options.seed,
            "fingerprint": calibration.fingerprint,
        },
        "options": {**asdict(options), "finetune": asdict(finetune)},
        "recipe": recipe_text,
        "blocks": [asdict(r) for r in reports],
        "finetune": tuned_report,
        "allocation": allocation,
    }
    files = write_quantized(
        folder, work_dir, out, hf_config.num_hidden_layers, load_catalog_matrix, metadata, tuned
    )
    return {
        "model": model,
        "out": str(out),
        "config": config.name,
        "bits": bits,
        "mixed": bool(layers),
        "layers": len(reports),
        "seconds": round(time.perf_counter() - began, 2),
        "files": files,
        "work_dir": str(work_dir),
        "blocks": json.loads(json.dumps([asdict(r) for r in reports])),
        "finetune": tuned_report,
        "allocation": allocation,
    }


def allocate_bits(
    folder: Path,
    shapes: dict[tuple[int, str], tuple[int, int]],
    config: LatticeConfig,
    calibration: Calibration,
    work_dir: Path,
    progress: Callable[[dict], None] | None = None,
) -> tuple[dict[int, dict[str, LatticeConfig]], dict]:
    """Per-linear configs averaging `config.bits` (quant/allocation.py), from the Fisher
    sensitivity of the full-precision model on the first SENSITIVITY_WINDOWS calibration
    windows (quant/sensitivity.py). The sensitivities are cached in work_dir/sensitivity.json
    under a fingerprint of the model and the windows, so a resume does not measure again.

    Returns the overrides {layer: {kind: config}} and a JSON-ready report.
    """
    from transformers import AutoModelForCausalLM

    from liftq_cli.io.atomic import atomic_file
    from liftq_cli.quant.allocation import allocate
    from liftq_cli.quant.lattice_catalog import catalog_mse
    from liftq_cli.quant.pipeline import job_fingerprint
    from liftq_cli.quant.sensitivity import fisher_sensitivity

    windows = calibration.input_ids[:SENSITIVITY_WINDOWS]
    fingerprint = job_fingerprint(
        {
            "model": str(folder),
            "weights": WeightReader(folder).fingerprint(),
            "calibration": calibration.fingerprint,
            "windows": list(windows.shape),
            "version": SENSITIVITY_VERSION,
        }
    )
    cache = work_dir / "sensitivity.json"
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("fingerprint") == fingerprint:
        kappa: dict[tuple[int, str], float] = {}
        for name, value in saved["kappa"].items():  # "11.down_proj" -> (11, "down_proj")
            layer, _, kind = name.partition(".")
            kappa[(int(layer), kind)] = value
    else:
        began = time.perf_counter()
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

        def step(done: int, total: int) -> None:
            if progress is not None:
                progress({"event": "sensitivity", "step": done, "steps": total})

        kappa = fisher_sensitivity(model, windows, progress=step)
        del model
        work_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache) as tmp:
            payload = {
                "fingerprint": fingerprint,
                "seconds": round(time.perf_counter() - began, 1),
                "kappa": {f"{layer}.{kind}": v for (layer, kind), v in sorted(kappa.items())},
            }
            tmp.write_text(json.dumps(payload, indent=1))
    missing = set(shapes) - set(kappa)
    if missing:
        raise BadInputError(
            f"sensitivity in {cache} lacks {len(missing)} linears: delete it to measure again"
        )
    result = allocate(shapes, {k: kappa[k] for k in shapes}, catalog_mse(), config.bits, config)
    layers: dict[int, dict[str, LatticeConfig]] = {}
    for (layer, kind), cfg in sorted(result.configs.items()):
        layers.setdefault(layer, {})[kind] = cfg
    counts = Counter(cfg.name for cfg in result.configs.values())
    report = {
        "method": "fisher",
        "target_bits": config.bits,
        "code_bits": round(result.code_bits, 6),
        "windows": int(windows.shape[0]),
        "predicted_vs_uniform": round(result.predicted / result.uniform_predicted, 4)
        if result.uniform_predicted
        else None,
        "configs": dict(sorted(counts.items())),
    }
    return layers, report


def finetune_windows(text, tokenizer, seqlen: int, config: FinetuneConfig) -> Calibration:
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
    work_dir: Path,
    windows: Calibration,
    config: FinetuneConfig,
    progress: Callable[[dict], None] | None = None,
) -> tuple[dict, dict]:
    """Run (or reuse from `work_dir`) model-level fine-tuning over the finished blocks.

    Returns the tuned tensors by checkpoint name and a JSON-ready report. The result is saved
    as work_dir/finetune.safetensors under a fingerprint of the block job and `config`, so a
    resume after it finished skips it; an interrupted one starts over (it is deterministic).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from liftq_cli.io.atomic import atomic_file
    from liftq_cli.quant.lattice_catalog import load_catalog_matrix
    from liftq_cli.quant.pipeline import job_fingerprint, load_block_quant

    job = json.loads((work_dir / "job.json").read_text())["fingerprint"]
    fingerprint = job_fingerprint(
        {"job": job, "finetune": asdict(config), "windows": windows.fingerprint}
    )
    path = work_dir / "finetune.safetensors"
    if path.is_file():
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        if meta.get("fingerprint") == fingerprint:
            return load_file(path), json.loads(meta["report"])
    with quiet_transformers():
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    quantized = {
        f"model.layers.{layer}.{name}": quant
        for layer in range(student.config.num_hidden_layers)
        for name, quant in load_block_quant(work_dir, layer, load_catalog_matrix).items()
    }
    tuned = attach(student, quantized)

    def step(done: int, total: int, loss: float) -> None:
        if progress is not None:
            progress({"event": "finetune", "step": done, "steps": total, "kl": loss})

    train = windows.input_ids[: config.steps * config.batch]
    probe = windows.input_ids[config.steps * config.batch :]
    result = finetune(student, teacher, tuned, train, probe, config, step)
    tensors = tuned_tensors(student, tuned)
    report = {k: v for k, v in asdict(result).items() if k != "losses"}
    report["kl_first_last"] = [result.losses[0], result.losses[-1]] if result.losses else []
    with atomic_file(path) as tmp:
        save_file(
            tensors, str(tmp), metadata={"fingerprint": fingerprint, "report": json.dumps(report)}
        )
    return tensors, report


def linear_shapes(skeleton) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, kind) -> (out, in) of every decoder linear, read off the meta-device model."""
    from liftq_cli.quant.sensitivity import decoder_linears

    return {key: (m.out_features, m.in_features) for key, m in decoder_linears(skeleton).items()}


def check_overrides(
    layers: dict[int, dict[str, LatticeConfig]], shapes: dict[tuple[int, str], tuple[int, int]]
) -> None:
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


def average_bits(
    shapes: dict[tuple[int, str], tuple[int, int]], config_for: Callable[[int, str], LatticeConfig]
) -> float:
    """Code bits per weight over all decoder linears (D/d weighted by each linear's size)."""
    total = sum(o * i for o, i in shapes.values())
    bits = sum(o * i * config_for(*key).bits for key, (o, i) in shapes.items()) / max(total, 1)
    return round(bits, 6)
