"""The shipped catalog of trained lattice matrices (package data in `quant/catalog/`).

`lattice.safetensors` holds one float32 (d, D) tensor per config, keyed `LQ-D-d`;
`manifest.json` records for each how it was trained (seed, Lloyd iterations, samples) and
its Gaussian MSE on the fixed 100k-sample held-out set. `build_catalog` retrains every
entry of `CATALOG_CONFIGS` reproducibly; `build_catalog_into` does so into a staging folder
and swaps the finished catalog in once (`liftq lattice build-catalog --out DIR`), so an
interrupted build leaves the old catalog as it was. This module is the only lattice code
that touches disk.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_dir, atomic_file
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.quant.lattice import DEFAULT_SEARCH, SearchConfig, encode
from liftq_cli.quant.lattice_train import TrainConfig, TrainResult, train_matrix

CATALOG_DIR = Path(__file__).parent / "catalog"
MATRIX_FILE = "lattice.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


# The catalog's training schedule (Lloyd, see lattice_train), sized to build the whole
# catalog on a 2-core CPU in about an hour. The configs with a published MSE get a wider
# training beam and a second start. LQ-16/8 is the closed-form block Hadamard matrix with
# only its scale fitted: on fresh samples it is below the matrix Lloyd trained from Hadamard
# starts (bench/results/lattice_16_8.md), which was ~1% below Lloyd from random starts.
# LQ-32/16 starts from a Hadamard-structured matrix, then pools the normal equations of its
# last steps and is polished and shipped at beam 256 (0.0819; the earlier 80-step schedule
# from random starts ended at 0.0826 at beam 64).
_BASE_SCHEDULE = TrainConfig(
    iterations=30,
    samples=32_768,
    final_iterations=2,
    final_samples=262_144,
    train_beam=32,
    restarts=1,
)
PUBLISHED = {(16, 8), (32, 16), (30, 14), (24, 10), (32, 20)}


def train_config_for(cfg: LatticeConfig, seed: int = 0) -> TrainConfig:
    """The catalog's schedule for one config (fixed, so that a rebuild is reproducible)."""
    pair = (cfg.D, cfg.d)
    if pair == (16, 8):
        return replace(
            _BASE_SCHEDULE, iterations=0, final_iterations=12, init="blocks", fit="scale", seed=seed
        )
    if pair == (32, 16):
        return replace(
            _BASE_SCHEDULE,
            iterations=200,
            final_iterations=100,
            final_samples=32_768,
            train_beam=64,
            memory=0.9,
            polish_iterations=80,
            polish_beam=256,
            search_beam=256,
            init="hadamard",
            ratio=1.0,
            seed=seed,
        )
    if pair in PUBLISHED:
        return replace(_BASE_SCHEDULE, train_beam=64, restarts=2, seed=seed)
    return replace(_BASE_SCHEDULE, seed=seed)


def tensor_key(cfg: LatticeConfig) -> str:
    return f"LQ-{cfg.D}-{cfg.d}"


def _how_to_get(cfg: LatticeConfig) -> str:
    return f"train it with `liftq lattice train --D {cfg.D} --d {cfg.d} --out FILE`"


@functools.lru_cache(maxsize=4)
def _read(folder: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = Path(folder)
    matrix_path, manifest_path = path / MATRIX_FILE, path / MANIFEST_FILE
    if not matrix_path.is_file() or not manifest_path.is_file():
        raise BadInputError(
            f"lattice catalog not found in {path}: rebuild it with "
            f"`liftq lattice build-catalog --out {path}`"
        )
    return load_file(str(matrix_path)), json.loads(manifest_path.read_text())


def catalog_manifest(folder: Path = CATALOG_DIR) -> dict[str, Any]:
    """The parsed manifest.json: format_version, train/search settings, `entries` list."""
    return _read(str(folder))[1]


def load_catalog_matrix(cfg: LatticeConfig, folder: Path = CATALOG_DIR) -> Tensor:
    """The trained matrix for `cfg`: float32 tensor of shape (cfg.d, cfg.D) (a fresh copy)."""
    tensors, _ = _read(str(folder))
    key = tensor_key(cfg)
    if key not in tensors:
        raise BadInputError(
            f"lattice {cfg.name} is not in the catalog ({len(tensors)} entries, see "
            f"`liftq lattice list`): {_how_to_get(cfg)}"
        )
    matrix = tensors[key].clone()
    if tuple(matrix.shape) != (cfg.d, cfg.D):
        raise BadInputError(
            f"catalog matrix {key} has shape {tuple(matrix.shape)}, expected ({cfg.d}, "
            f"{cfg.D}): rebuild it with `liftq lattice build-catalog --out {folder}`"
        )
    return matrix


def catalog_mse(folder: Path = CATALOG_DIR) -> dict[LatticeConfig, float]:
    """Gaussian MSE of every catalog config, from the catalog manifest."""
    by_name = {e["name"]: e["gaussian_mse"] for e in catalog_manifest(folder)["entries"]}
    return {c: by_name[c.name] for c in CATALOG_CONFIGS if c.name in by_name}


def catalog_search(cfg: LatticeConfig, folder: Path = CATALOG_DIR) -> SearchConfig:
    """The encoder settings `cfg`'s catalog matrix ships with: the default search at the
    entry's `search_beam` (the beam its reported MSE was measured with)."""
    entries = catalog_manifest(folder)["entries"]
    entry = next((e for e in entries if e["name"] == cfg.name), {})
    return replace(DEFAULT_SEARCH, beam=int(entry.get("search_beam", DEFAULT_SEARCH.beam)))


def catalog_encode(x: Tensor, M: Tensor, beam: int = 0) -> Tensor:
    """`encode` with the search of M's catalog entry (found by M's shape (d, D)); a beam > 0
    replaces the entry's beam (quantize.search_beam)."""
    d, D = M.shape
    search = catalog_search(LatticeConfig(D, d))
    return encode(x, M, replace(search, beam=beam) if beam else search)


def load_matrix_file(path: Path, cfg: LatticeConfig | None = None) -> Tensor:
    """A matrix written by `liftq lattice train --out FILE` (safetensors, one tensor)."""
    if not path.is_file():
        raise BadInputError(f"lattice matrix file {path} does not exist: check the path")
    tensors = load_file(str(path))
    if cfg is not None and tensor_key(cfg) in tensors:
        return tensors[tensor_key(cfg)]
    if len(tensors) != 1:
        raise BadInputError(f"{path} holds {len(tensors)} tensors: expected one lattice matrix")
    return next(iter(tensors.values()))


def save_matrix_file(result: TrainResult, path: Path) -> None:
    """Write one trained matrix (safetensors) with its manifest entry as metadata."""
    metadata = {k: str(v) for k, v in result.manifest_entry().items()}
    with atomic_file(Path(path)) as tmp:
        save_file({tensor_key(result.config): result.matrix.contiguous()}, str(tmp), metadata)


def build_catalog(
    configs: Iterable[LatticeConfig] = CATALOG_CONFIGS,
    seed: int = 0,
    on_done: Callable[[TrainResult], None] | None = None,
    device: str = "cpu",
) -> list[TrainResult]:
    """Train every config with the catalog schedule on `device` (returns the results).

    On 2 CPU cores the whole catalog takes about an hour (two processes); a GPU, minutes.
    """
    results = []
    for cfg in configs:
        result = train_matrix(cfg, train_config_for(cfg, seed), device=device)
        results.append(result)
        if on_done is not None:
            on_done(result)
    return results


def _with_current_keys(entry: dict[str, Any]) -> dict[str, Any]:
    """An entry written before a schedule setting existed, with that setting's default
    (the value it was trained with), so every entry carries the same keys."""
    defaults = TrainConfig()
    missing = {
        "memory": defaults.memory,
        "polish_iterations": defaults.polish_iterations,
        "polish_beam": defaults.polish_beam,
        "search_beam": defaults.search_beam,
        "fit": defaults.fit,
    }
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key not in missing:
            out[key] = value
        if key == "train_beam":  # where a new entry has them
            out.update({k: entry.get(k, v) for k, v in missing.items()})
    return out


def _existing(folder: Path) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """The tensors and manifest entries, by config name, of the catalog in `folder` (if any)."""
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    if (folder / MATRIX_FILE).is_file():
        old_tensors, old_manifest = _read(str(folder))
        for e in old_manifest["entries"]:
            entries[e["name"]] = _with_current_keys(e)
            tensors[e["name"]] = old_tensors[tensor_key(LatticeConfig(e["D"], e["d"]))]
    return tensors, entries


def _write_catalog(
    folder: Path,
    results: list[TrainResult],
    base: tuple[dict[str, Tensor], dict[str, dict[str, Any]]] = ({}, {}),
) -> None:
    """Write lattice.safetensors + manifest.json into `folder` (in place, not atomically):
    the entries of `base` (see `_existing`) that `results` does not retrain, plus `results`."""
    tensors, entries = dict(base[0]), dict(base[1])
    for r in results:
        tensors[r.config.name] = r.matrix.contiguous()
        entries[r.config.name] = r.manifest_entry()
    ordered = sorted(entries.values(), key=lambda e: (e["bits"], -e["d"]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "built_by": "liftq lattice build-catalog",
        "source": "i.i.d. N(0, I_d); MSE per dimension on the fixed held-out sample, "
        "encoded with the default search",
        "search": asdict(DEFAULT_SEARCH),
        "entries": ordered,
    }
    by_key = {
        tensor_key(LatticeConfig(e["D"], e["d"])): tensors[e["name"]].contiguous() for e in ordered
    }
    save_file(by_key, str(folder / MATRIX_FILE), {"format_version": str(FORMAT_VERSION)})
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def save_catalog(results: list[TrainResult], folder: Path, merge: bool = False) -> None:
    """Write lattice.safetensors + manifest.json for `results` (atomically, as one folder).

    merge=True keeps the entries of an existing catalog that `results` does not retrain.
    """
    base = _existing(folder) if merge else ({}, {})
    with atomic_dir(folder) as tmp:
        _write_catalog(tmp, results, base)
    _read.cache_clear()


def _check_target(out: Path) -> None:
    """Refuse an `out` that is not a catalog folder: the swap replaces the whole folder."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file: pass a folder for the catalog")
    if out.is_dir():
        other = sorted(p.name for p in out.iterdir() if p.name not in (MATRIX_FILE, MANIFEST_FILE))
        if other:
            raise BadInputError(
                f"--out {out} holds other files than a lattice catalog ({', '.join(other[:3])}) "
                "and would be replaced as a whole: pass a new folder or an existing catalog"
            )


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of this process (or of a dead one with a reused pid)
    if os.name != "posix":
        return True  # no cheap liveness check: keep it rather than break a running build
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Clean up after a build of `out` that was killed before its own cleanup could run.

    Its staging folder `.NAME.tmp-PID` is removed; the old catalog that `atomic_dir` moves
    aside during the swap (`.NAME.old.PID`) is put back if the new one never arrived, else
    removed. Leftovers of a build that is still running (its pid is alive) are kept.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp-|old\.)(\d+)")
    if not out.parent.is_dir():
        return
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match[2])):
            continue
        if match[1] == "old." and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def build_catalog_into(
    out: Path,
    configs: Iterable[LatticeConfig] = CATALOG_CONFIGS,
    seed: int = 0,
    keep_others: bool = False,
    on_done: Callable[[TrainResult], None] | None = None,
    device: str = "cpu",
) -> list[TrainResult]:
    """Train `configs` with the catalog schedule and swap the finished catalog into `out`.

    Each finished config is written to the staging folder `.NAME.tmp-PID` next to `out`;
    only after the last one does the staged catalog replace `out` (one `atomic_dir` swap),
    so an interrupted or failed build leaves `out` as it was. keep_others=True starts from a
    copy of the catalog at `out` (if any) and keeps the entries `configs` does not retrain.
    Leftovers of an earlier build of `out` that was killed are cleaned up first.
    """
    out = Path(out)
    _remove_stale(out)
    _check_target(out)
    base = _existing(out) if keep_others else ({}, {})
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    staging.mkdir(parents=True)
    results: list[TrainResult] = []

    def staged(result: TrainResult) -> None:
        results.append(result)
        _write_catalog(staging, results, base)
        if on_done is not None:
            on_done(result)

    try:
        if base[1]:
            for name in (MATRIX_FILE, MANIFEST_FILE):
                shutil.copy2(out / name, staging / name)
        build_catalog(configs, seed=seed, on_done=staged, device=device)
        if not (staging / MATRIX_FILE).is_file():
            raise BadInputError("no lattice config to build: name at least one with --only")
        with atomic_dir(out) as tmp:
            for name in (MATRIX_FILE, MANIFEST_FILE):
                os.replace(staging / name, tmp / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _read.cache_clear()
    return results
