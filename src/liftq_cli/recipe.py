"""Typed quantization recipe: what `liftq plan --write-recipe` and every `liftq quantize`
write, and what `liftq quantize --recipe` reads.

A recipe is a small YAML document with a format version:

    format_version: 2
    model: meta-llama/Meta-Llama-3-70B   # hub id, local folder or preset name
    config: LQ-23/10                     # lattice config of every quantized linear ...
    layers:                              # ... except these per-layer overrides (mixed plans)
      0: {v_proj: LQ-32/10, down_proj: LQ-30/10}
    embed: host                          # fp16 | int8 | int4 | host (kept in host RAM)
    lm_head: int8                        # fp16 | int8 | int4
    ctx: 4096                            # context the plan was made for
    batch: 1
    kv_bits: 16
    vram_bytes: 24000000000              # the budget of the plan
    predicted_bytes: 23197707526         # the plan's predicted GPU bytes
    quantize:                            # every stage's settings (`QuantizeSettings`)
      calibration: {source: wiki, nsamples: 64, seqlen: 512}
      seed: 0
      whiten_steps: 50
      ...

`quantize:` maps one to one onto `quantize_job.QuantizeSettings`; missing keys take the
values of its `effort` preset (`quantize_job.EFFORTS`; default: `default`), so a version-1
recipe (a memory plan only, no such section) still loads and quantizes with today's defaults.
`liftq quantize --recipe R` with no other setting reproduces the run that wrote R. `loads`
validates every field (one-line `BadInputError` naming the field and the fix);
`dumps(loads(text)) == text` for any text `dumps` wrote, and `loads(dumps(r)) == r`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from liftq_cli.errors import BadInputError, LiftqError
from liftq_cli.io.atomic import write_text_atomic
from liftq_cli.lattice_config import LatticeConfig, LatticeConfigError
from liftq_cli.plan.architectures import LINEAR_KINDS, Architecture, linears, resolve_architecture
from liftq_cli.plan.memory import (
    DEFAULT_CTX,
    DEFAULT_EMBED,
    DEFAULT_LM_HEAD,
    KV_BITS,
    LM_HEAD_CHOICES,
    PRECISIONS,
)
from liftq_cli.plan.solver import Plan
from liftq_cli.quantize_job import QuantizeJob, QuantizeSettings, settings_from_dict

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: no `quantize:` section
_FIELDS = (
    "format_version",
    "model",
    "config",
    "layers",
    "embed",
    "lm_head",
    "ctx",
    "batch",
    "kv_bits",
    "vram_bytes",
    "predicted_bytes",
    "quantize",
)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe; `layers[layer][kind]` overrides `config` for that linear."""

    model: str
    config: LatticeConfig
    layers: dict[int, dict[str, LatticeConfig]] = field(default_factory=dict)
    embed: str = DEFAULT_EMBED  # what `liftq pack` writes unless --embed / --lm-head say else
    lm_head: str = DEFAULT_LM_HEAD
    ctx: int = DEFAULT_CTX
    batch: int = 1
    kv_bits: int = 16
    vram_bytes: int | None = None
    predicted_bytes: int | None = None
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    format_version: int = FORMAT_VERSION

    def config_for(self, layer: int, kind: str) -> LatticeConfig:
        """The lattice config of linear `kind` (q_proj, ..., down_proj) in block `layer`."""
        return self.layers.get(layer, {}).get(kind, self.config)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready values, fields in schema order."""
        return {
            "format_version": self.format_version,
            "model": self.model,
            "config": self.config.name,
            "layers": {
                layer: {kind: cfg.name for kind, cfg in kinds.items()}
                for layer, kinds in sorted(self.layers.items())
            },
            "embed": self.embed,
            "lm_head": self.lm_head,
            "ctx": self.ctx,
            "batch": self.batch,
            "kv_bits": self.kv_bits,
            "vram_bytes": self.vram_bytes,
            "predicted_bytes": self.predicted_bytes,
            "quantize": self.quantize.to_dict(),
        }


def _positive_int(data: Mapping[str, Any], key: str, where: str, optional: bool = False) -> Any:
    value = data.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadInputError(f"{where}: '{key}' = {value!r} must be a positive integer")
    return value


def _config(value: Any, where: str) -> LatticeConfig:
    if not isinstance(value, str):
        raise BadInputError(f"{where} = {value!r} must be a config name like LQ-24/10")
    try:
        return LatticeConfig.parse(value)
    except LatticeConfigError as exc:
        raise BadInputError(f"{where}: {exc}") from None


def from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed YAML mapping into a `Recipe`."""
    if not isinstance(data, Mapping):
        raise BadInputError(f"{source} is not a YAML mapping: write `format_version: 1` etc.")
    version = data.get("format_version")
    if isinstance(version, bool) or version not in READS:
        raise BadInputError(
            f"{source}: format_version {version!r} is not supported (this liftq reads "
            f"{' and '.join(map(str, READS))}): re-run `liftq plan --write-recipe` or upgrade liftq"
        )
    if version == 1 and "quantize" in data:
        raise BadInputError(f"{source}: a quantize section needs format_version 2: set it")
    unknown = [str(key) for key in data if key not in _FIELDS]
    if unknown:
        raise BadInputError(
            f"{source}: unknown field(s) {', '.join(unknown)}: allowed are {', '.join(_FIELDS)}"
        )
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadInputError(f"{source}: 'model' must name a model (hub id, folder or preset)")
    layers_in = data.get("layers") or {}
    if not isinstance(layers_in, Mapping):
        raise BadInputError(f"{source}: 'layers' must map layer index -> {{kind: config}}")
    layers: dict[int, dict[str, LatticeConfig]] = {}
    for layer, kinds in layers_in.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise BadInputError(f"{source}: layer key {layer!r} must be an index >= 0")
        if not isinstance(kinds, Mapping) or not kinds:
            raise BadInputError(f"{source}: layers.{layer} must map kind -> config")
        for kind in kinds:
            if kind not in LINEAR_KINDS:
                raise BadInputError(
                    f"{source}: layers.{layer}.{kind} is not a linear kind: use one of "
                    f"{', '.join(LINEAR_KINDS)}"
                )
        layers[layer] = {
            kind: _config(value, f"{source}: layers.{layer}.{kind}")
            for kind, value in kinds.items()
        }
    embed, lm_head = data.get("embed", DEFAULT_EMBED), data.get("lm_head", DEFAULT_LM_HEAD)
    if embed not in PRECISIONS:
        raise BadInputError(f"{source}: embed {embed!r} is unknown: use {', '.join(PRECISIONS)}")
    if lm_head not in LM_HEAD_CHOICES:
        raise BadInputError(
            f"{source}: lm_head {lm_head!r} is unknown: use {', '.join(LM_HEAD_CHOICES)}"
        )
    kv_bits = data.get("kv_bits", 16)
    if kv_bits not in KV_BITS or isinstance(kv_bits, bool):
        raise BadInputError(f"{source}: kv_bits {kv_bits!r} is unknown: use 16, 8 or 4")
    return Recipe(
        model=model,
        config=_config(data.get("config"), f"{source}: config"),
        layers=layers,
        embed=embed,
        lm_head=lm_head,
        ctx=_positive_int(data, "ctx", source),
        batch=_positive_int({"batch": data.get("batch", 1)}, "batch", source),
        kv_bits=kv_bits,
        vram_bytes=_positive_int(data, "vram_bytes", source, optional=True),
        predicted_bytes=_positive_int(data, "predicted_bytes", source, optional=True),
        quantize=settings_from_dict(data.get("quantize") or {}, source),
        format_version=FORMAT_VERSION,
    )


def dumps(recipe: Recipe) -> str:
    """The recipe as YAML text (fields in schema order)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None)


def loads(text: str, source: str = "recipe") -> Recipe:
    """Parse and validate YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(f"{source} is not valid YAML ({first}): fix the file") from None
    return from_dict(data, source)


def load(path: Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read recipe '{path}' ({exc}): check the path") from None
    return loads(text, f"recipe '{path}'")


def dump(recipe: Recipe, path: Path) -> None:
    """Write the recipe atomically (temporary file, then rename)."""
    write_text_atomic(Path(path), dumps(recipe))


def from_plan(plan: Plan, model_ref: str) -> Recipe:
    """The plan as a recipe: the most common config plus per-layer overrides, default
    quantize settings."""
    counts = Counter(plan.assignment.values())
    base: LatticeConfig = max(counts, key=lambda cfg: (counts[cfg], cfg.bits))
    layers: dict[int, dict[str, LatticeConfig]] = {}
    for spec in linears(plan.arch):
        cfg = plan.assignment[spec.name]
        if cfg != base:
            layers.setdefault(spec.layer, {})[spec.kind] = cfg
    s = plan.settings
    return Recipe(
        model=model_ref,
        config=base,
        layers=layers,
        embed=s.embed,
        lm_head=s.lm_head,
        ctx=s.ctx,
        batch=s.batch,
        kv_bits=s.kv_bits,
        vram_bytes=plan.vram_bytes,
        predicted_bytes=plan.total_bytes,
    )


def for_job(job: QuantizeJob) -> Recipe:
    """The recipe that reproduces `job`: its model, lattice, overrides and settings, with the
    memory-plan fields of the recipe it came from (if any)."""
    base = loads(job.recipe, "the job's recipe") if job.recipe else Recipe(job.model, job.lattice)
    layers = {k: dict(v) for k, v in sorted(job.layers.items())}
    return replace(base, model=job.model, config=job.lattice, layers=layers, quantize=job.settings)


_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
)


def check_model(recipe: Recipe, model: str, arch: Architecture, source: str = "recipe") -> None:
    """Refuse a recipe planned for another model than `model` (whose shapes are `arch`).

    The recipe's model may name the same weights differently (a hub id for a local folder, a
    preset for an alias), so names that differ are compared by architecture: the recipe's
    model is resolved offline-first (presets, folders, the hub cache) and every shape that
    the plan and the overrides rest on must agree. A recipe whose model cannot be resolved is
    accepted only when the names agree.
    """
    named = recipe.model.strip()
    if named == model or _short(named) == _short(model):
        return
    try:
        planned = resolve_architecture(named)
    except LiftqError as exc:
        raise BadInputError(
            f"{source} is for model '{named}', not '{model}', and '{named}' cannot be resolved "
            f"here to compare ({exc}): write a recipe for this model with `liftq plan --model "
            f"{model} --write-recipe`"
        ) from None
    differ = [f for f in _SHAPE_FIELDS if getattr(planned, f) != getattr(arch, f)]
    if differ:
        diffs = ", ".join(f"{f} {getattr(planned, f)} vs {getattr(arch, f)}" for f in differ)
        raise BadInputError(
            f"{source} is for model '{named}', not '{model}' ({diffs}): write a recipe for this "
            f"model with `liftq plan --model {model} --write-recipe`"
        )


def _short(name: str) -> str:
    """The last path or hub-id component, lower case: '/data/Llama-3-8B' ~ 'meta/llama-3-8b'."""
    return name.rstrip("/").rpartition("/")[2].lower()
