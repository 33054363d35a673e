"""Model architectures for planning: from a preset, a local config.json or a hub id.

`resolve_architecture` turns `--model` into an `Architecture` (plan/shapes.py: the shapes of
every linear and the parameter counts; plan/hf_config.py: the config.json reader). Presets live
in `presets/*.yaml` as the published `config.json` fields (so a preset and a downloaded config
go through the same parser) with the publisher's parameter count, and for a mixture of experts
the publisher's active count per token.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.plan.hf_config import from_hf_config as from_hf_config
from liftq_cli.plan.shapes import ATTENTION_KINDS as ATTENTION_KINDS
from liftq_cli.plan.shapes import LINEAR_KINDS as LINEAR_KINDS
from liftq_cli.plan.shapes import MLP_KINDS as MLP_KINDS
from liftq_cli.plan.shapes import SHARED_MLP_KINDS as SHARED_MLP_KINDS
from liftq_cli.plan.shapes import Architecture as Architecture
from liftq_cli.plan.shapes import LinearSpec as LinearSpec
from liftq_cli.plan.shapes import active_param_count as active_param_count
from liftq_cli.plan.shapes import embedding_params as embedding_params
from liftq_cli.plan.shapes import layer_linears as layer_linears
from liftq_cli.plan.shapes import linears as linears
from liftq_cli.plan.shapes import other_params as other_params
from liftq_cli.plan.shapes import param_count as param_count

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """A shipped model: canonical name, hub id, aliases and the published config fields."""

    name: str
    hf_id: str
    aliases: tuple[str, ...]
    published_params: int
    config: Mapping[str, Any]
    published_active_params: int | None = None  # MoE: the publisher's count per token
    active_counts_embedding: bool = True  # whether that count includes the embedding table

    def architecture(self) -> Architecture:
        return from_hf_config(self.config, self.name, f"preset {self.name}", self.published_params)


@cache
def presets() -> dict[str, Preset]:
    """All shipped presets, keyed by canonical name, in file order."""
    found: dict[str, Preset] = {}
    folder = resources.files("liftq_cli.plan") / "presets"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        for item in yaml.safe_load(entry.read_text(encoding="utf-8")) or []:
            preset = Preset(
                name=item["name"],
                hf_id=item["hf_id"],
                aliases=tuple(item.get("aliases", ())),
                published_params=int(item["published_params"]),
                config=item["config"],
                published_active_params=(
                    int(item["published_active_params"])
                    if "published_active_params" in item
                    else None
                ),
                active_counts_embedding=bool(item.get("active_counts_embedding", True)),
            )
            found[preset.name] = preset
    return found


@cache
def _lookup() -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for preset in presets().values():
        for key in (preset.name, preset.hf_id, *preset.aliases):
            table[key.lower()] = preset
    return table


def find_preset(name: str) -> Preset | None:
    """The preset called `name` (canonical name, alias or hub id; case-insensitive)."""
    return _lookup().get(name.strip().lower())


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(
            f"cannot read '{path}' as JSON ({exc}): pass a valid config.json"
        ) from None
    if not isinstance(data, dict):
        raise BadInputError(f"'{path}' is not a JSON object: pass a model's config.json")
    return data


def _hub_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    # Read the variable now: huggingface_hub only reads it once, at import.
    offline = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in {"1", "true", "yes", "on"}
    try:
        return Path(hf_hub_download(repo_id, "config.json", local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        why = (
            "HF_HUB_OFFLINE is set, so it was not downloaded: unset HF_HUB_OFFLINE to fetch it once"
            if offline
            else "the hub cannot be reached: check the network and retry"
        )
        raise ResourceError(
            f"config.json of hub model '{repo_id}' is not in the local Hugging Face cache and "
            f"{why}, or pass a local folder with its config.json (or a preset: `liftq plan "
            f"--list-models`)"
        ) from exc
    except GatedRepoError as exc:
        raise ResourceError(
            f"hub model '{repo_id}' is gated: accept its licence on the hub and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise BadInputError(
            f"hub model '{repo_id}' does not exist (or is private): check the id or set HF_TOKEN"
        ) from exc
    except EntryNotFoundError as exc:
        raise BadInputError(f"hub model '{repo_id}' has no config.json: pass an LLM repo") from exc
    except OSError as exc:
        raise ResourceError(f"cannot fetch config.json of '{repo_id}': {exc}") from exc


def resolve_architecture(spec: str) -> Architecture:
    """Turn `--model` into an Architecture: preset/alias, local folder or config.json, hub id.

    Hub ids of presets resolve to the preset without the network; other hub ids download only
    `config.json` (HF_HUB_OFFLINE is honoured).
    """
    preset = find_preset(spec)
    if preset is not None:
        return preset.architecture()
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise BadInputError(f"folder '{spec}' has no config.json: pass a Hugging Face folder")
        return from_hf_config(_read_config(config), path.name, str(config))
    if path.is_file():
        return from_hf_config(_read_config(path), path.parent.name or path.stem, str(path))
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return from_hf_config(_read_config(_hub_config(spec)), spec, f"hub {spec}")
    close = difflib.get_close_matches(spec.lower(), list(_lookup()), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BadInputError(
        f"unknown model '{spec}'{hint}: run `liftq plan --list-models`, or pass a folder with "
        f"config.json or a hub id like owner/name"
    )


def model_reference(spec: str) -> str:
    """What a recipe should name to fetch the weights: a preset's hub id, else the spec."""
    preset = find_preset(spec)
    return preset.hf_id if preset is not None else spec
