"""`liftq push PACKED_DIR --repo user/name`: publish a folder with a model card on the Hub."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, err_console, handle_errors, interactive
from liftq_cli.errors import BadInputError
from liftq_cli.hub.card import quantization, render_card
from liftq_cli.hub.compare import COMPARE_PNG, compare, compare_section, read_bench
from liftq_cli.hub.folder import CARD_FILENAME, base_model_id, read_folder
from liftq_cli.hub.upload import (
    check_repo_id,
    check_revision,
    describe_base,
    push,
    resolve_token,
)
from liftq_cli.io.quantized import is_quantized_folder
from liftq_cli.plan.memory import format_bytes


def _warn(lines: list[str], as_json: bool) -> None:
    if as_json:
        return  # carried in the JSON object instead
    for line in lines:
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


@handle_errors
def push_command(
    packed_dir: Path = typer.Argument(
        ..., help="Folder to publish: `liftq pack` output, or any folder with config.json."
    ),
    repo: str = typer.Option(..., "--repo", help="Hub repo id: user/name or org/name."),
    private: bool = typer.Option(
        False, "--private", help="Create the repo private (an existing repo keeps its visibility)."
    ),
    revision: str = typer.Option(
        "main", "--revision", help="Branch to commit to; created from main when missing."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List the files and print the card; create and upload nothing."
    ),
    eval_json: list[Path] | None = typer.Option(
        None,
        "--eval-json",
        help="`liftq eval --json` output for the card (repeatable; default: liftq_eval.json).",
    ),
    base_model: str | None = typer.Option(
        None, "--base-model", help="Hub id of the full-precision model (default: from liftq.json)."
    ),
    license_id: str | None = typer.Option(
        None, "--license", help="Licence id for the card (default: the base model's)."
    ),
    compare_json: Path | None = typer.Option(
        None,
        "--compare",
        help="A quality bench result (bench/results/quality.json): put this model's point on "
        "its bits/w vs perplexity plot in the card (needs an eval with the bench's protocol).",
    ),
    message: str | None = typer.Option(None, "--message", "-m", help="Commit message."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Upload a quantised model with a model card (token: HF_TOKEN or `hf auth login`)."""
    check_repo_id(repo)
    check_revision(revision)
    if is_quantized_folder(packed_dir):  # transformers cannot load it: nobody could use it
        raise BadInputError(
            f"'{packed_dir}' is a `liftq quantize` output, which transformers cannot load: run "
            f"`liftq pack {packed_dir} --out PACKED` and push PACKED"
        )
    info = read_folder(packed_dir, eval_json)
    base_id = base_model_id(info, base_model)
    section, extra = None, {}
    if compare_json is not None:  # checked before the token: a bad bench file costs no login
        found = compare(
            info, read_bench(compare_json), base_id, quantization(info).stored_bits,
            compare_json.name,
        )  # fmt: skip
        section, extra = compare_section(found), {COMPARE_PNG: found.png()}
    token, source = (None, "") if dry_run else resolve_token()
    base, warnings = describe_base(info, base_id, license_id, token)
    if any(f.path_in_repo in extra for f in info.files):
        warnings.append(f"{packed_dir}/{COMPARE_PNG} is not uploaded: --compare draws it anew")
        info = replace(info, files=[f for f in info.files if f.path_in_repo not in extra])
    if info.quantization_config is None:
        warnings.append(
            f"{packed_dir}/config.json has no quantization_config: this is not a packed folder "
            "(run `liftq pack` first to publish the compact format)"
        )
    if info.own_readme:
        warnings.append(f"{packed_dir}/README.md is not uploaded: the generated card replaces it")
    card = render_card(info, base, repo, section)
    if dry_run:
        _warn(warnings, as_json)
        files = [{"path": f.path_in_repo, "bytes": f.size} for f in info.files]
        files.append({"path": CARD_FILENAME, "bytes": len(card.encode("utf-8"))})
        files += [{"path": k, "bytes": len(v)} for k, v in extra.items()]
        if as_json:
            emit_json(
                {
                    "dry_run": True,
                    "repo": repo,
                    "revision": revision,
                    "private": private,
                    "files": files,
                    "bytes": sum(f["bytes"] for f in files),
                    "card": card,
                    "warnings": warnings,
                }
            )
            return
        table = Table(title=f"dry run: would push to {repo} ({revision}); nothing is uploaded")
        table.add_column("file")
        table.add_column("size", justify="right")
        for f in files:
            table.add_row(f["path"], format_bytes(f["bytes"]))
        console.print(table)
        print(f"--- {CARD_FILENAME} ---")
        print(card, end="")
        return
    assert token is not None
    result = push(
        info,
        card,
        repo,
        token,
        source,
        revision=revision,
        private=private,
        message=message,
        show_progress=interactive() and not as_json,
        extra=extra,
    )
    result.warnings = warnings + result.warnings
    if as_json:
        emit_json(result.as_json())
        return
    _warn(result.warnings, False)
    state = "created" if result.created else "existing"
    visibility = "private" if result.private else "public"
    total = sum(f["bytes"] for f in result.files)
    console.print(
        f"pushed {len(result.files)} files ({format_bytes(total)}) to {result.url} "
        f"(revision {result.revision}, commit {result.commit[:7]}; {state} {visibility} repo)",
        highlight=False,
        soft_wrap=True,
    )
    qc = result.verified["quantization_config"]
    kept = (
        f"quantization_config survived (quant_method {qc['quant_method']}, "
        f"format_version {qc['format_version']})"
        if qc
        else "it has no quantization_config"
    )
    console.print(
        f"verified: config.json read back from the Hub matches the local one; {kept}",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("push")(push_command)
