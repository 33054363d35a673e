"""`liftq quantize MODEL --out DIR --bits 2.4`: the layerwise LiftQuant quantiser.

Parses the options into one `QuantizeJob` (settings not given on the command line come from
`--recipe`'s quantize section, else the defaults) and hands it to `quant.job.run_job`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from liftq_cli.cli._common import console, handle_errors, interactive, progress_bar
from liftq_cli.errors import BadInputError, LiftqError, ResourceError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant import preflight
from liftq_cli.quant.events import BlockDone, Event, FinetuneStep, PreflightReady, SensitivityStep
from liftq_cli.quant.job import QuantizeResult, config_for_bits, run_job
from liftq_cli.quant.job import dry_run as dry_run_plan
from liftq_cli.quantize_job import QuantizeJob, QuantizeSettings


@handle_errors
def quantize_command(
    model: str = typer.Argument(..., help="Alias (smollm2-135m), HF folder, .gguf or hub id."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    bits: float | None = typer.Option(None, "--bits", help="Target bits (nearest catalog config)."),
    config: str | None = typer.Option(None, "--config", help="Lattice config, e.g. LQ-24/10."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML from `liftq plan`."),
    effort: str | None = typer.Option(
        None,
        "--effort",
        help="Preset: fast, default (sized for 2 CPU cores) or best (for a GPU); flags override.",
    ),
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
        None,
        "--correction-steps",
        help="Most steps per block; held-out windows stop it earlier (default: 100).",
    ),
    independent: bool | None = typer.Option(
        None, "--independent/--sequential", help="Feed every block full-precision inputs."
    ),
    ldlq: bool | None = typer.Option(
        None, "--ldlq/--no-ldlq", help="Encode with Hessian error feedback (LDLQ) (default: on)."
    ),
    true_sequential: bool | None = typer.Option(
        None,
        "--true-sequential/--no-true-sequential",
        help="Encode a block's linears stage by stage (q/k/v, o, gate/up, down), each "
        "measured with the earlier ones quantized (default: off).",
    ),
    compensate: bool | None = typer.Option(
        None,
        "--compensate/--no-compensate",
        help="Encode each linear toward the full-precision model's output, correcting the "
        "error earlier linears left in its input; needs --true-sequential to see a block's "
        "own earlier linears (default: off).",
    ),
    compensate_damp: float | None = typer.Option(
        None,
        "--compensate-damp",
        help="Ridge of --compensate, times the mean Gram diagonal: larger trusts the "
        "calibration less (default: 0.1).",
    ),
    finetune_steps: int | None = typer.Option(
        None,
        "--finetune-steps",
        help="Model-level KD fine-tuning steps after the blocks (0: off; holds the whole "
        "model twice in memory) (default: 0).",
    ),
    correction_loss: str | None = typer.Option(
        None,
        "--correction-loss",
        help="What correction minimises: mse (every output value alike) or token (each "
        "token's error relative to its output's norm) (default: mse).",
    ),
    whiten_rotations: str | None = typer.Option(
        None,
        "--whiten-rotations",
        help="The whitening's P1, P2: fixed (random-sign Hadamard, or DCT-II where a factor is "
        "not a power of two) or trained (Cayley-parametrised, with s1, s2) (default: fixed).",
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
    device: str = typer.Option(
        "auto", "--device", help="auto (a GPU when CUDA is there, else the CPU), cpu, cuda, cuda:N."
    ),
    tf32: bool = typer.Option(
        True, "--tf32/--no-tf32", help="Allow TF32 for float32 matmuls on CUDA (fp64 stays)."
    ),
    nproc: int = typer.Option(
        1,
        "--nproc",
        help="Processes on this machine, one job (launches torch.distributed.run: one per GPU "
        "with --device cuda; gloo on CPU). Across nodes: torchrun ... -m liftq_cli quantize.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the preflight (disk, host RAM, GPU memory, time per block) and stop; a job "
        "that cannot fit exits 3. Needs no weights for a preset (llama-70b).",
    ),
    as_json: bool = typer.Option(False, "--json", help="JSON-lines progress and a JSON summary."),
) -> None:
    """Quantise every linear of the decoder blocks, block by block, resumably."""
    if nproc < 1 or nproc > 1024:
        raise BadInputError(f"--nproc {nproc} is invalid: pass a process count from 1 to 1024")
    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInputError(
            f"--nproc {nproc} under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}): let "
            "torchrun start the processes and drop --nproc"
        )
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
    if effort is not None:
        if recipe is not None:
            raise BadInputError(
                f"--effort {effort} with --recipe: the recipe's quantize section sets every "
                "value; edit its `effort:` key or drop --effort"
            )
        base = QuantizeSettings.preset(effort, seed or 0)
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
        "whiten_rotations": whiten_rotations,
        "ldlq": ldlq,
        "sequential": None if independent is None else not independent,
        "true_sequential": true_sequential,
        "compensate": compensate,
        "compensate_damp": compensate_damp,
        "mixed": mixed,
        "correction.steps": correction_steps,
        "correction.loss": correction_loss,
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
        device=device,
        tf32=tf32,
    )
    if dry_run:
        world = nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))
        pre = dry_run_plan(job, world)
        if as_json:
            print(json.dumps({"event": "preflight", **preflight.as_json(pre)}), flush=True)
        else:
            console.print(preflight.render(pre), highlight=False, markup=False)
        preflight.check(pre)
        return
    if nproc > 1:
        result = launch(job, nproc, as_json)
    else:
        bar = interactive() and not as_json and int(os.environ.get("RANK", "0")) == 0
        with progress_bar(bar) as update:
            result = run_job(job, reporter(as_json, bar, update))
    if result is None:  # a rank other than 0: rank 0 reports
        return
    if as_json:  # JSON lines throughout: the summary is the last line
        print(json.dumps({"event": "done", **result.as_json()}), flush=True)
        return
    print_summary(model, result)


def reporter(as_json: bool, bar: bool, update) -> Callable[[Event], None]:
    """The progress callback: JSON lines, a bar's updates, or plain log lines."""

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
        elif isinstance(event, PreflightReady):
            if not as_json:
                console.print(event.line, highlight=False, markup=False, soft_wrap=True)
        elif isinstance(event, BlockDone):
            r = event.report
            if log:
                console.print(
                    f"block {r.layer + 1}/{event.layers}: output MSE "
                    f"{r.mse_before:.4g} -> {r.mse_after:.4g}, {r.flipped:.3%} of code bits "
                    f"flipped (step {r.correction_steps} kept), {r.seconds:.0f} s",
                    highlight=False,
                )
            update("blocks", r.layer + 1, event.layers)

    return report


def _worker(job: QuantizeJob, as_json: bool) -> QuantizeResult | LiftqError | None:
    """One process of `--nproc`: the result on rank 0 (None elsewhere), or the refusal it
    raised, handed back (an exception would be a dead rank to the launcher)."""
    try:
        return run_job(job, reporter(as_json, False, lambda *_: None))
    except LiftqError as exc:
        return exc


def launch(job: QuantizeJob, nproc: int, as_json: bool) -> QuantizeResult:
    """Run the job in `nproc` local processes through torch.distributed's elastic launcher
    (what torchrun --standalone does), each with its share of the CPU threads unless
    OMP_NUM_THREADS says otherwise; a failed rank fails the job in one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # the launcher's own notices (a rank being stopped after another failed) are not ours to
    # show; a failing rank's traceback (an error) still is
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"liftq-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        outcomes = elastic_launch(config, _worker)(job, as_json)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        raise ResourceError(
            f"rank {rank} of {nproc} died (exit code {failure.exitcode}): the work dir "
            f"'{job.work}' keeps every finished block; rerun the same command to resume"
        ) from None
    for rank in sorted(outcomes):  # a refusal: every rank raised it, report rank 0's
        if isinstance(outcomes[rank], LiftqError):
            raise outcomes[rank]
    return outcomes[0]


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
