"""`liftq lattice list|train|bench|build-catalog`: the lattice codebooks and their quality."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.table import Table

from liftq_cli.cli._common import console, emit_json, handle_errors, interactive, progress_bar
from liftq_cli.errors import BadInputError
from liftq_cli.io.outputs import check_output
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.quant.lattice import (
    SearchConfig,
    encode,
    gaussian_mse,
    pad_search_encode,
    rate_distortion_bound,
)
from liftq_cli.quant.lattice_catalog import (
    build_catalog_into,
    catalog_manifest,
    catalog_search,
    load_catalog_matrix,
    save_matrix_file,
)
from liftq_cli.quant.lattice_train import TrainConfig, TrainResult, held_out_sample, train_matrix

lattice_app = typer.Typer(
    help="Lattice codebooks: list the catalog, train a matrix, benchmark the encoder.",
    no_args_is_help=True,
)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object, no table.")


@lattice_app.command("list")
@handle_errors
def list_command(as_json: bool = JSON_OPTION) -> None:
    """List the shipped lattice configs with their Gaussian MSE."""
    manifest = catalog_manifest()
    entries = manifest["entries"]
    if as_json:
        emit_json({"format_version": manifest["format_version"], "entries": entries})
        return
    table = Table(title=f"Lattice catalog ({len(entries)} configs)")
    for column in ("config", "bits", "Gaussian MSE", "R-D bound", "beam", "train s"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for entry in entries:
        table.add_row(
            entry["name"],
            f"{entry['bits']:.2f}",
            f"{entry['gaussian_mse']:.4f}",
            f"{rate_distortion_bound(entry['bits']):.4f}",
            str(entry["search_beam"]),
            f"{entry['train_seconds']:.0f}",
        )
    console.print(table)


def _device(name: str) -> str:
    if name not in ("cpu", "cuda"):
        raise BadInputError(f"--device {name} is not supported: use cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available here, use --device cpu")
    return name


DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu or cuda (training is ~100x faster).")


@lattice_app.command("train")
@handle_errors
def train_command(
    D: int = typer.Option(..., "--D", help="Sign bits per slice (D > d, D <= 32)."),
    d: int = typer.Option(..., "--d", help="Slice dimension."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial matrices and samples."),
    iterations: int = typer.Option(40, "--iterations", help="Lloyd iterations."),
    samples: int = typer.Option(32_768, "--samples", help="Fresh Gaussian slices per iteration."),
    final_iterations: int = typer.Option(
        0, "--final-iterations", help="Extra Lloyd iterations on --final-samples slices each."
    ),
    final_samples: int = typer.Option(262_144, "--final-samples", help="Slices per final step."),
    beam: int = typer.Option(32, "--beam", help="K-best beam while training."),
    memory: float = typer.Option(
        0.0, "--memory", help="Final and polish steps pool earlier normal equations (0 to 0.99)."
    ),
    polish_iterations: int = typer.Option(
        0, "--polish-iterations", help="Last steps, encoded at --polish-beam."
    ),
    polish_beam: int = typer.Option(256, "--polish-beam", help="K-best beam of the polish steps."),
    search_beam: int = typer.Option(
        64, "--search-beam", help="Beam the matrix is evaluated (and would be shipped) with."
    ),
    restarts: int = typer.Option(1, "--restarts", help="Independent starts; the best is kept."),
    init: str = typer.Option(
        "orthonormal", "--init", help="orthonormal, hadamard (D = 2d) or blocks (LQ-16/8)."
    ),
    fit: str = typer.Option(
        "matrix", "--fit", help="Each step fits all of M (matrix) or only its scale (scale)."
    ),
    ratio: float = typer.Option(
        1.2, "--ratio", help="hadamard init: a in \\[a I, H/sqrt(d)] of the first start."
    ),
    device: str = DEVICE_OPTION,
    out: Path | None = typer.Option(None, "--out", help="Write the matrix here (safetensors)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a previous output of this command at that path."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Train the matrix M of LQ-D/d on a Gaussian source (Lloyd) and report its MSE."""
    cfg = LatticeConfig(D, d)
    if out is not None:  # checked before the training
        check_output(out, "--out", "lattice-matrix", overwrite=overwrite)
    train = TrainConfig(
        iterations=iterations,
        samples=samples,
        final_iterations=final_iterations,
        final_samples=final_samples,
        train_beam=beam,
        memory=memory,
        polish_iterations=polish_iterations,
        polish_beam=polish_beam,
        search_beam=search_beam,
        restarts=restarts,
        init=init,
        fit=fit,
        seed=seed,
        ratio=ratio,
    )
    train.check(cfg)
    device = _device(device)
    with progress_bar(interactive() and not as_json) as update:
        result = train_matrix(
            cfg, train, lambda i, n: update(f"train {cfg.name}", i, n), device=device
        )
    if out is not None:
        save_matrix_file(result, out)
    if as_json:
        emit_json({**result.as_json(), "out": str(out) if out else None})
        return
    console.print(
        f"{cfg.name} ({cfg.bits:.2f} bits): Gaussian MSE {result.mse:.5f} "
        f"(bound {rate_distortion_bound(cfg.bits):.5f}), {result.seconds:.1f} s"
        + (f", written to {out}" if out else ""),
        highlight=False,
    )


@lattice_app.command("bench")
@handle_errors
def bench_command(
    config: str = typer.Option("LQ-24/10", "--config", help="Catalog config, e.g. LQ-24/10."),
    samples: int = typer.Option(2000, "--samples", help="Gaussian slices to encode."),
    pad_samples: int = typer.Option(
        200, "--pad-samples", help="Slices for the pad search (0 skips it)."
    ),
    beam: int | None = typer.Option(
        None, "--beam", help="K-best beam width (default: the catalog entry's beam)."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Time our encoder against the published pad search on the same matrix and slices."""
    cfg = LatticeConfig.parse(config)
    if samples < 1 or pad_samples < 0:
        raise BadInputError("--samples must be positive and --pad-samples non-negative")
    M = load_catalog_matrix(cfg)
    x = held_out_sample(cfg.d, max(samples, pad_samples))
    search = catalog_search(cfg) if beam is None else SearchConfig(beam=beam)
    start = time.perf_counter()
    ours = encode(x[:samples], M, search)
    ours_s = time.perf_counter() - start
    row: dict[str, object] = {
        "config": cfg.name,
        "bits": cfg.bits,
        "samples": samples,
        "beam": search.beam,
        "mse": gaussian_mse(x[:samples], M, ours),
        "rd_bound": rate_distortion_bound(cfg.bits),
        "s_per_mweight": ours_s / (samples * cfg.d) * 1e6,
    }
    if pad_samples:
        start = time.perf_counter()
        pad = pad_search_encode(x[:pad_samples], M)
        pad_s = time.perf_counter() - start
        row["pad_samples"] = pad_samples
        row["pad_mse"] = gaussian_mse(x[:pad_samples], M, pad)
        row["ours_mse_on_pad_samples"] = gaussian_mse(x[:pad_samples], M, ours[:pad_samples])
        row["pad_s_per_mweight"] = pad_s / (pad_samples * cfg.d) * 1e6
        row["speedup"] = row["pad_s_per_mweight"] / row["s_per_mweight"]
    if as_json:
        emit_json(row)
        return
    table = Table(title=f"{cfg.name} encoder on N(0, I) slices")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in row.items():
        table.add_row(key, f"{value:.5g}" if isinstance(value, float) else str(value))
    console.print(table)


OUT_HELP = (
    "Catalog folder to write (required): a new folder or an existing catalog, replaced only "
    "once every config is trained. To rebuild the shipped catalog, from a checkout: "
    "--out src/liftq_cli/quant/catalog."
)


@lattice_app.command("build-catalog")
@handle_errors
def build_catalog_command(
    out: Path | None = typer.Option(None, "--out", help=OUT_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for every config."),
    only: str | None = typer.Option(
        None, "--only", help="Comma-separated configs to retrain, keeping the others."
    ),
    device: str = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Retrain every catalog matrix reproducibly and write safetensors + manifest.json.

    The build goes to a staging folder next to --out and replaces --out only at the end:
    an interrupted build leaves it as it was. The shipped catalog was built on CPU (two
    processes with --only and separate --out folders, then merged; about an hour on 2 busy
    cores); --device cuda takes minutes.
    """
    if out is None:
        raise BadInputError(
            "build-catalog writes a catalog folder: pass --out DIR (to rebuild the shipped "
            "catalog, from a checkout: --out src/liftq_cli/quant/catalog)"
        )
    configs = [LatticeConfig.parse(name) for name in only.split(",")] if only else CATALOG_CONFIGS
    device = _device(device)

    def done(result: TrainResult) -> None:
        if not as_json:
            console.print(
                f"{result.config.name}: MSE {result.mse:.5f} in {result.seconds:.0f} s",
                highlight=False,
            )

    results = build_catalog_into(
        out, configs, seed=seed, keep_others=bool(only), on_done=done, device=device
    )
    if as_json:
        emit_json({"out": str(out), "entries": [r.manifest_entry() for r in results]})


def register(app: typer.Typer) -> None:
    app.add_typer(lattice_app, name="lattice")
