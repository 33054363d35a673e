"""`liftq eval MODEL --ppl wikitext2[,wiki,FILE] [--speed]`: perplexity with the protocol
stated; `--speed` adds prefill/decode tokens/s and peak memory (beside `--kld-ref`'s model)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, handle_errors, interactive, progress_bar
from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.report import evaluate, parse_datasets, speed
from liftq_cli.io.atomic import write_text_atomic
from liftq_cli.io.outputs import check_output


@handle_errors
def eval_command(
    model: str = typer.Argument(..., help="Alias (smollm2-135m), HF folder, .gguf file or hub id."),
    ppl: str | None = typer.Option(
        None,
        "--ppl",
        help="Comma-separated texts: wikitext2, wiki or a text file (default: wikitext2, "
        "none with --speed alone).",
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
    speed_flag: bool = typer.Option(
        False, "--speed", help="Also measure prefill and decode tokens/s and peak memory."
    ),
    device: str = typer.Option("auto", "--device", help="--speed device: auto, cpu, cuda[:N]."),
    prompt: int = typer.Option(128, "--prompt", help="--speed prompt tokens per sequence."),
    new: int = typer.Option(32, "--new-tokens", help="--speed generated tokens (at least 2)."),
    speed_batch: int = typer.Option(1, "--speed-batch", help="--speed sequences at once."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, no table."),
) -> None:
    """Measure perplexity over non-overlapping windows (and, with --speed, tokens/s)."""
    if new < 2 or prompt < 1 or speed_batch < 1:
        raise BadInputError(
            f"--prompt {prompt}, --new-tokens {new}, --speed-batch {speed_batch}: need a prompt "
            f"of at least 1 token, at least 2 new tokens and a batch of at least 1"
        )
    if ppl is None and speed_flag:
        _speed_only(model, kld_ref, device, prompt, new, speed_batch, as_json)
        return
    datasets = parse_datasets(ppl or "wikitext2")
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
    timing = speed(model, kld_ref, device, prompt, new, speed_batch) if speed_flag else None
    payload = report.as_json() | ({"speed": timing.as_dict()} if timing else {})
    if save is not None:
        write_text_atomic(save, json.dumps(payload, indent=2, default=str) + "\n")
    if as_json:
        emit_json(payload)
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
    if timing is not None:
        _print_speed(model, kld_ref, timing)


def _speed_only(model, kld_ref, device, prompt, new, batch, as_json) -> None:
    timing = speed(model, kld_ref, device, prompt, new, batch)
    if as_json:
        emit_json({"model": model, "speed": timing.as_dict()})
        return
    _print_speed(model, kld_ref, timing)


def _print_speed(model: str, kld_ref: str | None, timing) -> None:
    first = timing.model
    table = Table(
        title=f"Speed on {first.device} ({first.dtype}, batch {first.batch}, prompt "
        f"{first.prompt_tokens}, {first.new_tokens} new tokens)"
    )
    for column in ("model", "prefill tok/s", "decode tok/s", "peak memory"):
        table.add_column(column, justify="left" if column == "model" else "right")
    rows = [(model, first)] + ([(kld_ref, timing.reference)] if timing.reference else [])
    for name, result in rows:
        peak = f"{result.peak_bytes / 2**20:,.0f} MiB ({result.peak_kind})"
        table.add_row(
            str(name), f"{result.prefill_tok_s:,.1f}", f"{result.decode_tok_s:,.2f}", peak
        )
    console.print(table)
    if timing.planned_bytes is not None:
        ratio = first.peak_bytes / timing.planned_bytes
        console.print(
            f"liftq plan predicts {timing.planned_bytes / 2**20:,.0f} MiB for this ctx and batch "
            f"(without the CUDA context); measured {ratio:.2f} x of it",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
