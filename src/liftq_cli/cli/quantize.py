"""`liftq quantize MODEL --out DIR --bits 2.4`: the layerwise LiftQuant quantiser."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from liftq_cli.cli._common import console, handle_errors, interactive, progress_bar
from liftq_cli.errors import BadInputError
from liftq_cli.quant.block_correction import CorrectionConfig
from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.finetune import FinetuneConfig
from liftq_cli.quant.pipeline import QuantizeOptions
from liftq_cli.quant.run import config_for_bits, quantize


@handle_errors
def quantize_command(
    model: str = typer.Argument(..., help="Alias (smollm2-135m), HF folder, .gguf or hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    bits: float | None = typer.Option(None, "--bits", help="Target bits (nearest catalog config)."),
    config: str | None = typer.Option(None, "--config", help="Lattice config, e.g. LQ-24/10."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML from `liftq plan`."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration text: wiki or a text file."),
    nsamples: int = typer.Option(64, "--nsamples", help="Calibration windows."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling, whitening and correction."),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="Resumable work directory (default: .OUT.work beside --out)."
    ),
    whiten_steps: int = typer.Option(50, "--whiten-steps", help="Adam steps on s1, s2."),
    correction_steps: int = typer.Option(50, "--correction-steps", help="Steps per block."),
    independent: bool = typer.Option(
        False, "--independent", help="Feed every block full-precision inputs."
    ),
    ldlq: bool = typer.Option(
        True, "--ldlq/--no-ldlq", help="Encode with Hessian error feedback (LDLQ)."
    ),
    finetune_steps: int = typer.Option(
        0,
        "--finetune-steps",
        help="Model-level KD fine-tuning steps after the blocks (0: off; holds the whole "
        "model twice in memory).",
    ),
    finetune_lr: float = typer.Option(1e-3, "--finetune-lr", help="Peak fine-tuning rate."),
    finetune_calib: str | None = typer.Option(
        None, "--finetune-calib", help="Fine-tuning text: wiki or a file (default: --calib)."
    ),
    mixed: bool = typer.Option(
        False,
        "--mixed",
        help="Same average bits, spread over the linears by measured sensitivity (one Fisher "
        "pass of the whole model first).",
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
    recipe_text, overrides = None, {}
    if recipe is not None:
        from liftq_cli.recipe import load

        loaded = load(recipe)
        lattice, overrides = loaded.config, loaded.layers  # mixed plans override per linear
        recipe_text = recipe.read_text()
    elif config is not None:
        lattice = LatticeConfig.parse(config)
    else:
        assert bits is not None
        lattice = config_for_bits(bits)
    options = QuantizeOptions(
        seed=seed,
        whiten_steps=whiten_steps,
        sequential=not independent,
        ldlq=ldlq,
        correction=CorrectionConfig(steps=correction_steps),
    )
    tuning = FinetuneConfig(steps=finetune_steps, lr=finetune_lr, seed=seed)
    bar = interactive() and not as_json
    with progress_bar(bar) as update:

        def report(event: dict) -> None:
            if as_json:
                print(json.dumps(event), flush=True)
            if event["event"] == "sensitivity":
                if not as_json and not bar and event["step"] == event["steps"]:
                    console.print(
                        f"sensitivity measured ({event['steps']} batches)", highlight=False
                    )
                update("sensitivity", event["step"], event["steps"])
                return
            if event["event"] == "finetune":
                if not as_json and not bar and event["step"] in (1, event["steps"]):
                    console.print(
                        f"fine-tune step {event['step']}/{event['steps']}: KL {event['kl']:.4g}",
                        highlight=False,
                    )
                update("fine-tune", event["step"], event["steps"])
                return
            if not as_json and not bar:  # a log (CI, pipe): a plain line per block, no bar
                console.print(
                    f"block {event['layer'] + 1}/{event['layers']}: output MSE "
                    f"{event['mse_before']:.4g} -> {event['mse_after']:.4g}, "
                    f"{event['seconds']:.0f} s",
                    highlight=False,
                )
            update("blocks", event["layer"] + 1, event["layers"])

        summary = quantize(
            model,
            out,
            lattice,
            calib,
            nsamples,
            seqlen,
            work_dir,
            options,
            recipe_text,
            report,
            layers=overrides,
            finetune=tuning,
            finetune_calib=finetune_calib,
            mixed=mixed,
        )
    if as_json:  # JSON lines throughout: the summary is the last line
        print(json.dumps({"event": "done", **summary}, default=str), flush=True)
        return
    at = summary["config"]
    if summary["allocation"]:
        at = f"{len(summary['allocation']['configs'])} lattice configs chosen by sensitivity"
    elif summary["mixed"]:
        at = f"{at} + per-layer overrides"
    console.print(
        f"quantised {model} at {at} ({summary['bits']:.{3 if summary['mixed'] else 2}f} bits): "
        f"{summary['layers']} blocks in {summary['seconds']:.0f} s -> {summary['out']}",
        highlight=False,
    )
    if summary["finetune"]:
        tuned = summary["finetune"]
        verdict = "kept" if tuned["kept"] else "not kept (no gain)"
        console.print(
            f"fine-tuned: KL {tuned['kl_before']:.4g} -> {tuned['kl_after']:.4g}, {verdict}",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
