"""`liftq pack QUANT_DIR --out PACKED_DIR`: bit-pack a quantized folder (format: docs/FORMAT.md)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, handle_errors
from liftq_cli.plan.memory import format_bytes


@handle_errors
def pack_command(
    quant_dir: Path = typer.Argument(..., help="Folder written by `liftq quantize --out`."),
    out: Path = typer.Option(..., "--out", help="Packed output folder (written atomically)."),
    dtype: str = typer.Option(
        "float16", "--dtype", help="Embeddings, norms, biases: float16, bfloat16 or float32."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous output of this command at that path."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, no table."),
) -> None:
    """Pack sign codes to D/d bits per weight with fp16 scales and whitening factors."""
    from liftq_cli.io.packed import pack_quantized

    report = pack_quantized(quant_dir, out, dtype=dtype, overwrite=overwrite)
    if as_json:
        emit_json(report.as_json())
        return
    table = Table(title=f"Packed {quant_dir} -> {out}")
    for column in ("part", "bytes", "formula", "size"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, value in report.parts.items():
        formula = report.formula.get(part)
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


def register(app: typer.Typer) -> None:
    app.command("pack")(pack_command)
