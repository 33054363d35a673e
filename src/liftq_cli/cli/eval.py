"""`liftq eval MODEL --ppl wikitext2[,wiki,FILE]`: perplexity with the protocol stated."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, handle_errors, interactive, progress_bar
from liftq_cli.evaluate.report import evaluate, parse_datasets
from liftq_cli.io.atomic import write_text_atomic
from liftq_cli.io.outputs import check_output


@handle_errors
def eval_command(
    model: str = typer.Argument(..., help="Alias (smollm2-135m), HF folder, .gguf file or hub id."),
    ppl: str = typer.Option(
        "wikitext2", "--ppl", help="Comma-separated texts: wikitext2, wiki or a text file."
    ),
    ctx: int = typer.Option(1024, "--ctx", help="Window length in tokens (stride = ctx)."),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Evaluate only the first N tokens of each text."
    ),
    bos: bool = typer.Option(False, "--bos/--no-bos", help="Prepend BOS to every window."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder holding wiki.test.raw (else $LIFTQ_DATA, shared/)."
    ),
    batch_size: int = typer.Option(1, "--batch-size", help="Windows per forward pass."),
    kld_ref: str | None = typer.Option(
        None,
        "--kld-ref",
        help="Full-precision model: add KL divergence and top-1 agreement on the same tokens.",
    ),
    save: Path | None = typer.Option(
        None, "--save", help="Also write the JSON report to this file (for `liftq push`)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous output of this command at that path."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, no table."),
) -> None:
    """Measure perplexity over non-overlapping windows."""
    datasets = parse_datasets(ppl)
    if save is not None:  # checked before the (long) evaluation
        inputs = [Path(spec).expanduser() for spec in (model, kld_ref, *datasets) if spec]
        inputs = [p for p in inputs if p.exists()]
        check_output(save, "--save", "eval-report", inputs, overwrite)
    with progress_bar(interactive() and not as_json) as update:
        report = evaluate(
            model,
            datasets,
            ctx=ctx,
            max_tokens=max_tokens,
            bos=bos,
            data_dir=data_dir,
            batch_size=batch_size,
            progress=lambda name: lambda done, total: update(f"ppl {name}", done, total),
            kld_ref=kld_ref,
        )
    if save is not None:
        write_text_atomic(save, json.dumps(report.as_json(), indent=2, default=str) + "\n")
    if as_json:
        emit_json(report.as_json())
        return
    table = Table(title=f"Perplexity of {model}")
    columns = ["text", "ppl", "tokens", "windows", "scored"]
    if kld_ref is not None:
        columns += ["ref ppl", "KL (nats/token)", "top-1 agree"]
    for column in columns:
        table.add_column(column, justify="left" if column == "text" else "right")
    for name, result in report.results.items():
        row = [name, f"{result.ppl:.3f}", str(result.tokens), str(result.windows)]
        row.append(str(result.tokens_scored))
        if name in report.divergence:
            d = report.divergence[name]
            row += [f"{d.ref_ppl:.3f}", f"{d.kl_mean:.4f}", f"{d.top1_agreement:.4f}"]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"protocol: ctx {ctx}, stride {ctx} (non-overlapping, remainder dropped), "
        f"{'BOS + ' if bos else 'no BOS, '}{ctx - 1} scored per window, "
        f"max tokens {max_tokens or 'all'}; {report.seconds:.1f} s",
        highlight=False,
    )
    if kld_ref is not None:
        console.print(
            f"KL(ref || model) and top-1 agreement against {kld_ref} at the same scored tokens",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
