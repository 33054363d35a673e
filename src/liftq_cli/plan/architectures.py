"""Model architectures for planning: the shapes of every linear, from a preset or a config.json.

An `Architecture` holds the few `config.json` fields that fix a decoder's memory: hidden and
intermediate sizes, layers, attention heads, KV heads, head_dim, vocabulary, tied embeddings and
experts. `linears(arch)` lists the weight matrices LiftQuant quantizes (q/k/v/o and the MLP, or
every expert's MLP); everything else (embeddings, lm_head, norms, biases, routers) is counted
apart so the memory model can price it at its own precision.

Presets live in `presets/*.yaml` as the published `config.json` fields (so a preset and a
downloaded config go through the same parser) with the publisher's parameter count.
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

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

ATTENTION_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
SHARED_MLP_KINDS = ("shared_gate_proj", "shared_up_proj", "shared_down_proj")
LINEAR_KINDS = ATTENTION_KINDS + MLP_KINDS + SHARED_MLP_KINDS
"""Canonical linear names; MoE experts of one layer share their kind (`gate_proj` covers the
gate linear of every expert: HF Mixtral calls them experts.N.w1/w3/w2)."""

# model_type -> (norms per block, q/k RMSNorm per head, q/k/v bias, tied embeddings by default)
_FAMILY_DEFAULTS: dict[str, tuple[int, bool, bool, bool]] = {
    "llama": (2, False, False, False),
    "mistral": (2, False, False, False),
    "mixtral": (2, False, False, False),
    "qwen2": (2, False, True, False),
    "qwen2_moe": (2, False, True, False),
    "qwen3": (2, True, False, False),
    "qwen3_moe": (2, True, False, False),
    "gemma": (2, False, False, True),
    "gemma2": (4, False, False, True),
    "gemma3_text": (4, True, False, True),
    "gemma3": (4, True, False, True),
}
_REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


@dataclass(frozen=True)
class Architecture:
    """Decoder shapes that determine memory. Sizes are element counts, not bytes."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int = 0  # 0: dense MLP
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = False
    norms_per_layer: int = 2
    qk_norm: bool = False
    model_type: str = "llama"
    max_position_embeddings: int = 0
    published_params: int | None = None
    source: str = "preset"

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class LinearSpec:
    """One linear kind of one layer: `count` matrices of shape (out_features, in_features)."""

    layer: int
    kind: str
    out_features: int
    in_features: int
    count: int = 1

    @property
    def name(self) -> str:
        return f"layers.{self.layer}.{self.kind}"

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count


def layer_linears(arch: Architecture, layer: int) -> list[LinearSpec]:
    """The quantized linears of decoder block `layer`, attention first."""
    h = arch.hidden_size
    specs = [
        LinearSpec(layer, "q_proj", arch.q_dim, h),
        LinearSpec(layer, "k_proj", arch.kv_dim, h),
        LinearSpec(layer, "v_proj", arch.kv_dim, h),
        LinearSpec(layer, "o_proj", h, arch.q_dim),
    ]
    if arch.is_moe:
        inter, count = arch.moe_intermediate_size, arch.num_experts
    else:
        inter, count = arch.intermediate_size, 1
    specs += [
        LinearSpec(layer, "gate_proj", inter, h, count),
        LinearSpec(layer, "up_proj", inter, h, count),
        LinearSpec(layer, "down_proj", h, inter, count),
    ]
    if arch.shared_expert_intermediate_size:
        shared = arch.shared_expert_intermediate_size
        specs += [
            LinearSpec(layer, "shared_gate_proj", shared, h),
            LinearSpec(layer, "shared_up_proj", shared, h),
            LinearSpec(layer, "shared_down_proj", h, shared),
        ]
    return specs


def linears(arch: Architecture) -> list[LinearSpec]:
    """Every quantized linear of the model, layer by layer."""
    return [spec for layer in range(arch.num_layers) for spec in layer_linears(arch, layer)]


def other_params(arch: Architecture) -> int:
    """Parameters outside linears and embeddings, kept in fp16: norms, biases, MoE routers."""
    h = arch.hidden_size
    per_layer = arch.norms_per_layer * h
    if arch.qk_norm:
        per_layer += 2 * arch.head_dim
    if arch.qkv_bias:
        per_layer += arch.q_dim + 2 * arch.kv_dim
    if arch.is_moe:
        per_layer += arch.num_experts * h  # router
    if arch.shared_expert_intermediate_size:
        per_layer += h  # shared-expert gate (1 x hidden)
    return arch.num_layers * per_layer + h  # + final norm


def embedding_params(arch: Architecture) -> int:
    return arch.vocab_size * arch.hidden_size


def param_count(arch: Architecture) -> int:
    """Total parameters as published: linears, embeddings, lm_head (unless tied) and the rest."""
    lm_head = 0 if arch.tie_embeddings else embedding_params(arch)
    linear = sum(spec.params for spec in linears(arch))
    return linear + embedding_params(arch) + lm_head + other_params(arch)


def _int_field(config: Mapping[str, Any], key: str, where: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInputError(f"{where}: '{key}' = {value!r} must be a positive integer")
    return value


def from_hf_config(
    config: Mapping[str, Any],
    name: str,
    source: str,
    published_params: int | None = None,
) -> Architecture:
    """Build an `Architecture` from the fields of a Hugging Face `config.json`.

    Multimodal configs are read through their `text_config`. Missing optional fields take the
    defaults of the model family (`model_type`), as transformers does.
    """
    text = config.get("text_config")
    if isinstance(text, Mapping) and "hidden_size" in text:
        config = {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        raise BadInputError(
            f"{source}: config.json lacks {', '.join(missing)}: pass a decoder-only LLM config"
        )
    model_type = str(config.get("model_type", "llama"))
    norms, qk_norm, qkv_bias, tied = _FAMILY_DEFAULTS.get(model_type, (2, False, False, False))
    hidden = _int_field(config, "hidden_size", source)
    heads = _int_field(config, "num_attention_heads", source)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    experts = config.get("num_local_experts") or config.get("num_experts") or 0
    moe_inter = config.get("moe_intermediate_size") or config.get("intermediate_size")
    bias = config.get("attention_bias")
    arch = Architecture(
        name=name,
        hidden_size=hidden,
        intermediate_size=_int_field(config, "intermediate_size", source),
        num_layers=_int_field(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        vocab_size=_int_field(config, "vocab_size", source),
        tie_embeddings=bool(config.get("tie_word_embeddings", tied)),
        num_experts=int(experts),
        experts_per_token=int(config.get("num_experts_per_tok") or 0),
        moe_intermediate_size=int(moe_inter) if experts else 0,
        shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
        qkv_bias=qkv_bias if bias is None else bool(bias),
        norms_per_layer=norms,
        qk_norm=qk_norm,
        model_type=model_type,
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        published_params=published_params,
        source=source,
    )
    if arch.num_heads % arch.num_kv_heads:
        raise BadInputError(
            f"{source}: num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}: check the config.json"
        )
    return arch


@dataclass(frozen=True)
class Preset:
    """A shipped model: canonical name, hub id, aliases and the published config fields."""

    name: str
    hf_id: str
    aliases: tuple[str, ...]
    published_params: int
    config: Mapping[str, Any]

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
