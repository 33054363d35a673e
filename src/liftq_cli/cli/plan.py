"""`liftq plan --model NAME --vram 24GB`: the lattice config(s) that fill a GPU budget."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml

from liftq_cli.cli._common import console, emit_json, handle_errors
from liftq_cli.errors import BadInputError
from liftq_cli.io.outputs import check_output
from liftq_cli.plan import memory
from liftq_cli.plan.architectures import model_reference, resolve_architecture
from liftq_cli.plan.report import (
    alternatives_table,
    assumption_lines,
    breakdown_table,
    experts_table,
    mix_table,
    models_payload,
    models_table,
    plan_payload,
)
from liftq_cli.plan.solver import parse_sensitivity, plan_mixed, plan_uniform
from liftq_cli.recipe import dump, from_plan


def _read_sensitivity(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read --sensitivity '{path}' ({exc}): check the path") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"--sensitivity '{path}' is not YAML/JSON ({first}): fix it") from None


def _mib(n: int) -> str:
    return f"{n // memory.MIB}MiB"


def _size(text: str | None, option: str) -> int | None:
    return None if text is None else memory.parse_size(text, option)


@handle_errors
def plan(
    model: str | None = typer.Option(
        None, "--model", "-m", help="Preset or alias (llama-70b), folder with config.json, hub id."
    ),
    vram: str | None = typer.Option(
        None, "--vram", help="GPU budget: 24GB (10^9), 24GiB or 24G (2^30), 24000MB, bytes."
    ),
    ctx: int = typer.Option(memory.DEFAULT_CTX, "--ctx", help="Context length of the KV cache."),
    batch: int = typer.Option(memory.DEFAULT_BATCH, "--batch", help="Concurrent sequences."),
    kv_bits: int = typer.Option(memory.DEFAULT_KV_BITS, "--kv-bits", help="KV cache: 16, 8, 4."),
    embed: str = typer.Option(
        memory.DEFAULT_EMBED, "--embed", help="Embeddings: fp16, int8, int4 or host (host RAM)."
    ),
    lm_head: str = typer.Option(memory.DEFAULT_LM_HEAD, "--lm-head", help="fp16, int8 or int4."),
    overhead: str | None = typer.Option(
        None, "--overhead", help="Total runtime overhead (replaces the three below), e.g. 1GiB."
    ),
    cuda_context: str = typer.Option(
        _mib(memory.DEFAULT_CUDA_CONTEXT), "--cuda-context", help="CUDA context size."
    ),
    workspace: str = typer.Option(
        _mib(memory.DEFAULT_WORKSPACE), "--workspace", help="Workspaces + allocator slack."
    ),
    prefill_chunk: int = typer.Option(
        memory.DEFAULT_PREFILL_CHUNK, "--prefill-chunk", help="Tokens per prefill step."
    ),
    mixed: bool = typer.Option(False, "--mixed", help="Per-layer configs that fill the budget."),
    sensitivity: Path | None = typer.Option(
        None, "--sensitivity", help="YAML/JSON per-linear sensitivities for --mixed."
    ),
    write_recipe: Path | None = typer.Option(
        None, "--write-recipe", help="Write the plan as a YAML recipe for `liftq quantize`."
    ),
    list_models: bool = typer.Option(False, "--list-models", help="List presets and exit."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous output of this command at that path."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Pick the LiftQuant config(s) that fit a model into a VRAM budget, with the breakdown."""
    if list_models:
        if as_json:
            emit_json({"models": models_payload()})
        else:
            console.print(models_table())
        return
    if model is None or vram is None:
        missing = "--model" if model is None else "--vram"
        raise BadInputError(
            f"{missing} is required: e.g. `liftq plan --model llama-70b --vram 24GB` "
            f"(or --list-models)"
        )
    if sensitivity is not None and not mixed:
        raise BadInputError(f"--sensitivity {sensitivity} needs --mixed: add --mixed")
    if write_recipe is not None:
        inputs = [Path(model).expanduser() if Path(model).expanduser().exists() else None]
        check_output(write_recipe, "--write-recipe", "recipe", [*inputs, sensitivity], overwrite)
    vram_bytes = memory.parse_size(vram, "--vram", memory.MIN_VRAM)
    settings = memory.MemorySettings(
        ctx=ctx,
        batch=batch,
        kv_bits=kv_bits,
        embed=embed.lower(),
        lm_head=lm_head.lower(),
        cuda_context_bytes=memory.parse_size(cuda_context, "--cuda-context"),
        workspace_bytes=memory.parse_size(workspace, "--workspace"),
        prefill_chunk=prefill_chunk,
        overhead_bytes=_size(overhead, "--overhead"),
    )
    arch = resolve_architecture(model)
    if mixed:
        weights = None
        if sensitivity is not None:
            weights = parse_sensitivity(arch, _read_sensitivity(sensitivity))
        result = plan_mixed(arch, vram_bytes, settings, weights)
    else:
        result = plan_uniform(arch, vram_bytes, settings)
    ref = model_reference(model)
    if write_recipe is not None:
        dump(from_plan(result, ref), write_recipe)
    if as_json:
        payload = plan_payload(result, ref, vram, str(sensitivity) if sensitivity else None)
        if write_recipe is not None:
            payload["recipe"] = str(write_recipe)
        emit_json(payload)
        return
    console.print(breakdown_table(result))
    experts = experts_table(result)
    if experts is not None:
        console.print(experts)
    if result.mixed:
        console.print(mix_table(result))
    console.print(alternatives_table(result))
    for line in assumption_lines(result, vram):
        console.print(line, highlight=False, soft_wrap=True)
    if write_recipe is not None:
        console.print(f"recipe written to {write_recipe}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
