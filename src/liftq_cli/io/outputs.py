"""Output paths: checked before any work starts; nothing liftq did not write is ever replaced.

Every command that writes calls `check_output` for each output path (folders and files, work
dirs, `--save`, `--write-recipe`) before it does any work:

* an output equal to, inside, or containing one of the command's inputs is refused;
* an existing output is replaced only if it is a previous output of the same kind
  (`recognise`: recognised by liftq's own metadata), and then only with `--overwrite`;
  an existing non-empty folder or file of anything else is refused, whatever the flags;
* the nearest existing ancestor must be a writable folder (a temporary file is created and
  removed there to be sure);
* temporary siblings left by an interrupted write (`.NAME.PID.*.tmp`, `.NAME.old.PID`,
  io/atomic.py) whose process is gone are cleaned up.

Refusals are `BadInputError` (exit 2), one line naming the option, the path and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from liftq_cli.errors import BadInputError

Kind = Literal[
    "quantize", "pack", "work", "recipe", "eval-report", "lattice-matrix", "text", "catalog"
]
_WHAT = {
    "quantize": "a `liftq quantize` output folder",
    "pack": "a `liftq pack` output folder",
    "work": "a `liftq quantize` work dir",
    "recipe": "a liftq recipe",
    "eval-report": "a `liftq eval --save` report",
    "lattice-matrix": "a `liftq lattice train --out` matrix",
    "text": "a text file",
    "catalog": "a lattice catalog",
}
_FOLDER_KINDS = {"quantize", "pack", "work", "catalog"}
_WORK_FILE = re.compile(  # io/workdir.py's files, and their temporaries (io/atomic.py)
    r"^\.?(job\.json|\.lock|lock|streams\.json|streams\.safetensors|sensitivity\.json|"
    r"finetune\.safetensors|block_\d{4}\.safetensors)(\.\d+\.[^.]+\.tmp)?$"
)
_STALE = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)\.[^.]+\.tmp|old\.(?P<old>\d+))$")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def recognise(path: Path, kind: Kind) -> bool:
    """True when `path` is a previous liftq output of `kind`, by its own metadata."""
    path = Path(path)
    if kind in _FOLDER_KINDS and not path.is_dir():
        return False
    if kind == "quantize":
        meta, config = _json(path / "liftq.json"), _json(path / "config.json")
        return (
            isinstance(meta, dict)
            and "layers" in meta
            and "format_version" in meta
            and not (isinstance(config, dict) and "quantization_config" in config)
        )
    if kind == "pack":
        config = _json(path / "config.json")
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        return isinstance(qc, dict) and qc.get("quant_method") == "liftquant"
    if kind == "work":  # job.json is written after the lock and the sensitivities: go by names
        job = _json(path / "job.json")
        if isinstance(job, dict) and "fingerprint" in job and "settings" in job:
            return True
        names = [entry.name for entry in path.iterdir()]
        return bool(names) and all(_WORK_FILE.match(name) for name in names)
    if kind == "catalog":
        manifest = _json(path / "manifest.json")
        return isinstance(manifest, dict | list) and (path / "lattice.safetensors").is_file()
    if not path.is_file():
        return False
    if kind == "eval-report":
        data = _json(path)
        return isinstance(data, dict) and "ppl" in data and "protocol" in data
    if kind == "recipe":
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and {"format_version", "model", "config"} <= set(data)
    if kind == "lattice-matrix":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                name = (handle.metadata() or {}).get("name", "")
        except (OSError, SafetensorError):
            return False
        return name.startswith("LQ-")
    return False


def resolve_path(path: Path) -> Path:
    """Absolute, user-expanded, without following links (a link is checked as itself)."""
    return Path(os.path.abspath(Path(path).expanduser()))


def overlap(out: Path, inp: Path) -> str | None:
    """How `out` relates to `inp` ('is', 'is inside', 'contains') or None; both resolved."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "is inside"
    if out in inp.parents:
        return "contains"
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of `target` left by interrupted writes of dead processes;
    an old copy moved aside by an interrupted swap is put back when `target` is missing.
    Returns what was removed or restored."""
    target = resolve_path(target)
    if not target.parent.is_dir():
        return []
    done = []
    for entry in sorted(target.parent.iterdir()):
        match = _STALE.match(entry.name)
        if not match or match.group("name") != target.name:
            continue
        pid = int(match.group("pid") or match.group("old"))
        if _pid_alive(pid):
            continue
        if match.group("old") and not target.exists():
            os.replace(entry, target)  # the swap died between its two renames
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry)
    return done


def _check_writable(out: Path, option: str) -> None:
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise BadInputError(f"{option} '{out}' cannot be created: '{probe}' is not a folder")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as exc:
        raise BadInputError(
            f"{option} '{out}' cannot be written ({exc.strerror} in '{probe}'): choose a "
            f"writable location"
        ) from None


def check_output(
    out: Path,
    option: str,
    kind: Kind,
    inputs: Iterable[Path | None] = (),
    overwrite: bool = False,
) -> Path:
    """Refuse an output path that would destroy data or cannot be written (see the module
    docstring); returns it resolved. Cleans stale temporary siblings of `out`."""
    resolved = resolve_path(out)
    if resolved == resolved.parent:
        raise BadInputError(f"{option} '{out}' is the file system root: choose a new folder")
    for inp in inputs:
        if inp is None:
            continue
        relation = overlap(resolved, resolve_path(inp))
        if relation:
            raise BadInputError(
                f"{option} '{out}' {relation} the input '{inp}': choose an output outside "
                f"every input"
            )
    folder_kind = kind in _FOLDER_KINDS
    if resolved.exists() or resolved.is_symlink():
        ours = recognise(resolved, kind)
        empty_dir = resolved.is_dir() and not any(resolved.iterdir())
        if folder_kind and resolved.is_file():
            raise BadInputError(f"{option} '{out}' is a file, not a folder: choose a new folder")
        if not folder_kind and resolved.is_dir():
            raise BadInputError(f"{option} '{out}' is a folder: name a file to write")
        if not ours and not empty_dir:
            what = "folder" if resolved.is_dir() else "file"
            raise BadInputError(
                f"{option} '{out}' is an existing {what} that is not {_WHAT[kind]}: liftq "
                f"replaces only its own outputs; choose a new path"
            )
        if ours and not overwrite:
            raise BadInputError(
                f"{option} '{out}' already holds {_WHAT[kind]}: pass --overwrite to replace "
                f"it, or choose a new path"
            )
    _check_writable(resolved, option)
    clean_stale(resolved)
    return resolved


def existing(specs: Iterable[str | None]) -> list[Path]:
    """The specs that name an existing file or folder: the inputs an output must spare."""
    paths = [Path(spec).expanduser() for spec in specs if spec is not None]
    return [path for path in paths if path.exists()]


def check_work_dir(work: Path, out: Path, inputs: Iterable[Path]) -> None:
    """A job's resumable --work-dir: apart from its --out, and `check_output`'s rules (a
    work dir of this or an earlier job is resumed, never replaced)."""
    relation = overlap(resolve_path(work), resolve_path(out))
    if relation:  # writing --out would replace the work dir, or the reverse
        raise BadInputError(
            f"--work-dir '{work}' {relation} --out '{out}': keep them apart (the default "
            f"work dir is .NAME.work beside --out)"
        )
    check_output(work, "--work-dir", "work", inputs, overwrite=True)
