"""`liftq pack QUANT_DIR --out PACKED_DIR`: bit-pack a quantized folder (format: docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, handle_errors
from liftq_cli.io.embedding_format import DEFAULT_EMBED, DEFAULT_LM_HEAD
from liftq_cli.plan.memory import format_bytes


def planned_embeddings(
    quant_dir: Path, embed: str | None, lm_head: str | None
) -> tuple[str, str, str]:
    """(embed, lm_head, where the defaults came from): a flag not given takes the value of the
    recipe the quantize run recorded (QUANT_DIR/recipe.yaml, from `liftq plan`), else the
    plan's default, so the packed model is the one the plan priced. Values are validated by
    `pack_quantized`."""
    from liftq_cli.io.quantized import RECIPE_FILE
    from liftq_cli.recipe import load

    source = "given"
    if embed is None or lm_head is None:
        path = Path(quant_dir) / RECIPE_FILE
        if path.is_file() and path.read_text(encoding="utf-8").strip():
            recipe = load(path)
            planned, source = (recipe.embed, recipe.lm_head), f"the recipe {path}"
        else:
            planned, source = (DEFAULT_EMBED, DEFAULT_LM_HEAD), "the plan's defaults"
        embed = planned[0] if embed is None else embed
        lm_head = planned[1] if lm_head is None else lm_head
    return embed.strip().lower(), lm_head.strip().lower(), source


@handle_errors
def pack_command(
    quant_dir: Path = typer.Argument(..., help="Folder written by `liftq quantize --out`."),
    out: Path = typer.Option(..., "--out", help="Packed output folder (written atomically)."),
    dtype: str = typer.Option(
        "float16",
        "--dtype",
        help="fp16 / host embeddings and lm_head, norms, biases: float16, bfloat16 or float32.",
    ),
    embed: str | None = typer.Option(
        None,
        "--embed",
        help="Token embedding: fp16, int8, int4 or host (stored fp16, kept in host RAM). "
        f"Default: the quantize run's recipe, else {DEFAULT_EMBED} (the plan's default).",
    ),
    lm_head: str | None = typer.Option(
        None,
        "--lm-head",
        help=f"lm_head: fp16, int8 or int4. Default: the recipe's, else {DEFAULT_LM_HEAD}.",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous output of this command at that path."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, no table."),
) -> None:
    """Pack sign codes to D/d bits per weight with fp16 scales and whitening factors."""
    from liftq_cli.io.packed import pack_quantized

    embed, lm_head, source = planned_embeddings(quant_dir, embed, lm_head)
    report = pack_quantized(
        quant_dir, out, dtype=dtype, overwrite=overwrite, embed=embed, lm_head=lm_head
    )
    if as_json:
        emit_json({**report.as_json(), "embeddings_from": source})
        return
    table = Table(title=f"Packed {quant_dir} -> {out}")
    for column in ("part", "bytes", "formula", "size"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, value in report.parts.items():
        formula = {**report.formula, **report.embedding_formula}.get(part)
        table.add_row(
            part, f"{value:,}", "" if formula is None else f"{formula:,}", format_bytes(value)
        )
    console.print(table)
    bits = report.bits
    overhead = ", ".join(f"{k} {v:.4f}" for k, v in bits.overhead_bits.items())
    console.print(
        f"{sum(report.configs.values())} linears ({', '.join(report.configs)}): "
        f"{bits.effective_bits:.4f} bits per weight = {bits.nominal_bits:.4f} nominal (D/d) "
        f"+ overhead ({overhead}); files {format_bytes(sum(report.files.values()))}",
        highlight=False,
    )
    layout = report.embeddings
    if layout is not None:
        tied = ", tied: stored once" if layout.shared else ""
        console.print(
            f"embeddings {layout.embed}, lm_head {layout.lm_head}{tied} (from {source})",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("pack")(pack_command)
