"""`liftq quantize MODEL --out DIR --bits 2.4`: the layerwise LiftQuant quantiser.

Parses the options into one `QuantizeJob` (settings not given on the command line come from
`--recipe`'s quantize section, else the defaults) and hands it to `quant.job.run_job`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from liftq_cli.cli._common import console, handle_errors, interactive, progress_bar
from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.events import BlockDone, Event, FinetuneStep, SensitivityStep
from liftq_cli.quant.job import QuantizeResult, config_for_bits, run_job
from liftq_cli.quantize_job import QuantizeJob, QuantizeSettings


@handle_errors
def quantize_command(
    model: str = typer.Argument(..., help="Alias (smollm2-135m), HF folder, .gguf or hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    bits: float | None = typer.Option(None, "--bits", help="Target bits (nearest catalog config)."),
    config: str | None = typer.Option(None, "--config", help="Lattice config, e.g. LQ-24/10."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML from `liftq plan`."),
    calib: str | None = typer.Option(
        None, "--calib", help="Calibration text: wiki or a text file (default: wiki)."
    ),
    nsamples: int | None = typer.Option(
        None, "--nsamples", help="Calibration windows (default: 64)."
    ),
    seqlen: int | None = typer.Option(None, "--seqlen", help="Tokens per window (default: 512)."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed for sampling, whitening and correction (default: 0)."
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Resumable work directory (default: .OUT.work beside --out)."
    ),
    whiten_steps: int | None = typer.Option(
        None, "--whiten-steps", help="Adam steps on s1, s2 (default: 50)."
    ),
    correction_steps: int | None = typer.Option(
        None, "--correction-steps", help="Steps per block (default: 50)."
    ),
    independent: bool | None = typer.Option(
        None, "--independent/--sequential", help="Feed every block full-precision inputs."
    ),
    ldlq: bool | None = typer.Option(
        None, "--ldlq/--no-ldlq", help="Encode with Hessian error feedback (LDLQ) (default: on)."
    ),
    finetune_steps: int | None = typer.Option(
        None,
        "--finetune-steps",
        help="Model-level KD fine-tuning steps after the blocks (0: off; holds the whole "
        "model twice in memory) (default: 0).",
    ),
    finetune_lr: float | None = typer.Option(
        None, "--finetune-lr", help="Peak fine-tuning rate (default: 1e-3)."
    ),
    finetune_calib: str | None = typer.Option(
        None, "--finetune-calib", help="Fine-tuning text: wiki or a file (default: --calib)."
    ),
    mixed: bool | None = typer.Option(
        None,
        "--mixed/--uniform",
        help="Same average bits, spread over the linears by measured sensitivity (one Fisher "
        "pass of the whole model first).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous `liftq quantize` output at --out."
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON-lines progress and a JSON summary."),
) -> None:
    """Quantise every linear of the decoder blocks, block by block, resumably."""
    chosen = [
        name
        for name, value in (("--bits", bits), ("--config", config), ("--recipe", recipe))
        if value is not None
    ]
    if len(chosen) != 1:
        raise BadInputError(
            f"give exactly one of --bits, --config or --recipe (got {', '.join(chosen) or 'none'})"
        )
    base, recipe_text, overrides = QuantizeSettings(), None, {}
    if recipe is not None:
        from liftq_cli.recipe import load

        loaded = load(recipe)
        lattice, overrides, base = loaded.config, loaded.layers, loaded.quantize
        recipe_text = recipe.read_text()
    elif config is not None:
        lattice = LatticeConfig.parse(config)
    else:
        assert bits is not None
        lattice = config_for_bits(bits)
    given = {
        "calibration.source": calib,
        "calibration.nsamples": nsamples,
        "calibration.seqlen": seqlen,
        "seed": seed,
        "whiten_steps": whiten_steps,
        "ldlq": ldlq,
        "sequential": None if independent is None else not independent,
        "mixed": mixed,
        "correction.steps": correction_steps,
        "finetune.steps": finetune_steps,
        "finetune.lr": finetune_lr,
        "finetune.calib": finetune_calib,
    }
    job = QuantizeJob(
        model=model,
        out=out,
        lattice=lattice,
        layers=overrides,
        settings=override(base, {k: v for k, v in given.items() if v is not None}),
        work_dir=work_dir,
        recipe=recipe_text,
        overwrite=overwrite,
    )
    bar = interactive() and not as_json
    with progress_bar(bar) as update:

        def report(event: Event) -> None:
            if as_json:
                print(json.dumps(event.as_json()), flush=True)
            log = not as_json and not bar  # a log (CI, pipe): plain lines, no bar
            if isinstance(event, SensitivityStep):
                if log and event.step == event.steps:
                    console.print(f"sensitivity measured ({event.steps} batches)", highlight=False)
                update("sensitivity", event.step, event.steps)
            elif isinstance(event, FinetuneStep):
                if log and event.step in (1, event.steps):
                    console.print(
                        f"fine-tune step {event.step}/{event.steps}: KL {event.kl:.4g}",
                        highlight=False,
                    )
                update("fine-tune", event.step, event.steps)
            elif isinstance(event, BlockDone):
                r = event.report
                if log:
                    console.print(
                        f"block {r.layer + 1}/{event.layers}: output MSE "
                        f"{r.mse_before:.4g} -> {r.mse_after:.4g}, {r.seconds:.0f} s",
                        highlight=False,
                    )
                update("blocks", r.layer + 1, event.layers)

        result = run_job(job, report)
    if as_json:  # JSON lines throughout: the summary is the last line
        print(json.dumps({"event": "done", **result.as_json()}), flush=True)
        return
    print_summary(model, result)


def override(settings: QuantizeSettings, given: dict[str, Any]) -> QuantizeSettings:
    """`settings` with the dotted keys in `given` replaced (`correction.steps`, `seed`, ...);
    the job seed is also the fine-tuning seed."""
    top = {k: v for k, v in given.items() if "." not in k}
    for section in ("calibration", "correction", "finetune"):
        values = {k.partition(".")[2]: v for k, v in given.items() if k.startswith(section + ".")}
        if section == "finetune":
            values["seed"] = given.get("seed", settings.seed)
        if values:
            top[section] = replace(getattr(settings, section), **values)
    return replace(settings, **top)


def print_summary(model: str, result: QuantizeResult) -> None:
    at = result.config
    if result.allocation:
        at = f"{len(result.allocation['configs'])} lattice configs chosen by sensitivity"
    elif result.mixed:
        at = f"{at} + per-layer overrides"
    console.print(
        f"quantised {model} at {at} ({result.bits:.{3 if result.mixed else 2}f} bits): "
        f"{result.layers} blocks in {result.seconds:.0f} s -> {result.out}",
        highlight=False,
    )
    if result.finetune:
        tuned = result.finetune
        verdict = "kept" if tuned["kept"] else "not kept (no gain)"
        console.print(
            f"fine-tuned: KL {tuned['kl_before']:.4g} -> {tuned['kl_after']:.4g}, {verdict}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
