"""The model card (README.md) of a pushed model: Hub metadata, then what a reader needs.

Pure functions of a `FolderInfo` and the base model's facts: the YAML front matter
(base_model, base_model_relation, library_name, pipeline_tag, license, tags) followed by the
quantisation (lattice configs, bits per weight), the versions (liftq, checkpoint and packed
format), the evaluation table with its protocol, optionally the model's point on the quality
bench (`liftq push --compare`, hub/compare.py), the GPU memory needed at common context
lengths (liftq's planner memory model, `plan.memory.model_breakdown`), and the recipe.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from liftq_cli.errors import BadInputError
from liftq_cli.hub.folder import FolderInfo
from liftq_cli.hub.usage import use_section
from liftq_cli.lattice_config import LatticeConfig, LatticeConfigError
from liftq_cli.plan.architectures import LINEAR_KINDS, Architecture, from_hf_config, linears
from liftq_cli.plan.memory import MemorySettings, format_bytes, model_breakdown, quantized_bytes
from liftq_cli.version import __version__

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONTEXTS = (2048, 4096, 8192, 16384, 32768, 65536, 131072)
_LINEAR_NAME = re.compile(
    r"layers\.(\d+)\.(?:[\w.]*\.)?(" + "|".join(LINEAR_KINDS) + r")(?:\.weight)?$"
)
_PER_LINEAR_KEYS = ("layers", "configs", "modules", "linear_configs")


@dataclass(frozen=True)
class BaseInfo:
    """Facts about the full-precision model: hub id, licence, pipeline tag (each may be None)."""

    repo_id: str | None
    license: str | None = None
    pipeline_tag: str | None = None


def _config_name(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("config", "lattice"):
            if isinstance(value.get(key), str):
                return value[key]
    return None


def linear_configs(info: FolderInfo) -> dict[tuple[int, str], LatticeConfig]:
    """(layer, kind) -> lattice config of every quantised linear the folder describes.

    Read from liftq.json `layers` ({"model.layers.0.mlp.up_proj": "LQ-24/10", ...}) or the
    per-linear map of the packed `quantization_config`; names that are not decoder linears
    are ignored.
    """
    for source in (info.quantize_meta, info.quantization_config or {}):
        for key in _PER_LINEAR_KEYS:
            table = source.get(key)
            if not isinstance(table, dict) or not table:
                continue
            found: dict[tuple[int, str], LatticeConfig] = {}
            for name, value in table.items():
                match = _LINEAR_NAME.search(str(name))
                text = _config_name(value)
                if match is None or text is None:
                    continue
                try:
                    found[(int(match.group(1)), match.group(2))] = LatticeConfig.parse(text)
                except LatticeConfigError:
                    continue
            if found:
                return found
    return {}


def main_config(info: FolderInfo, per_linear: dict[tuple[int, str], LatticeConfig]) -> str | None:
    """The lattice config named by the folder (liftq.json `lattice`), else the most used."""
    for source in (info.quantize_meta, info.quantization_config or {}):
        for key in ("lattice", "config"):
            if isinstance(source.get(key), str):
                return source[key]
    if per_linear:
        return Counter(cfg.name for cfg in per_linear.values()).most_common(1)[0][0]
    return None


def _architecture(info: FolderInfo) -> Architecture | None:
    try:
        arch = from_hf_config(info.config, info.folder.name, "config.json")
    except (BadInputError, KeyError, TypeError, ValueError):
        return None
    stored = info.quantization_config or {}
    if "embed" in stored:
        # A packed config unties quantized pairs for transformers; `tied` says stored once.
        arch = replace(arch, tie_embeddings=stored.get("tied") is True)
    return arch


def public_name(spec: str) -> str:
    """A model or file as a Hub reader may see it: a hub id or alias as is, a local path by
    its last component only (a card must not publish the uploader's file system)."""
    looks_local = Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~"))
    if not looks_local and (_HUB_ID.match(spec) or "/" not in spec):
        return spec
    return spec.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def public_recipe(text: str, base_id: str | None) -> str:
    """The recipe with local paths replaced: its model by the base model's hub id (else the
    folder's name), calibration files by their names. A recipe that does not parse is shown
    as it is."""
    from liftq_cli.recipe import dumps, loads

    try:
        recipe = loads(text)
    except BadInputError:
        return text
    model = public_name(recipe.model)
    if model != recipe.model and base_id:
        model = base_id
    q = recipe.quantize
    calibration = replace(q.calibration, source=public_name(q.calibration.source))
    finetune = replace(q.finetune, calib=q.finetune.calib and public_name(q.finetune.calib))
    quantize = replace(q, calibration=calibration, finetune=finetune)
    public = replace(recipe, model=model, quantize=quantize)
    return text if public == recipe else dumps(public)


def _recipe_settings(info: FolderInfo) -> MemorySettings:
    """The plan's settings from the recipe; a packed folder's embed / lm_head are what
    `liftq pack` stored (fp16 / fp16 in a file from before it recorded them)."""
    settings = MemorySettings()
    text = info.recipe_text
    if text is not None:
        from liftq_cli.recipe import loads

        try:
            r = loads(text)
            settings = MemorySettings(
                ctx=r.ctx, batch=r.batch, kv_bits=r.kv_bits, embed=r.embed, lm_head=r.lm_head
            )
        except BadInputError:
            pass
    stored = info.quantization_config or {}
    if stored.get("quant_method") != "liftquant":
        return settings
    try:
        return replace(
            settings, embed=stored.get("embed", "fp16"), lm_head=stored.get("lm_head", "fp16")
        )
    except BadInputError:
        return settings


@dataclass(frozen=True)
class Quantization:
    """The quantisation facts the card states."""

    config: str | None
    bits: float | None  # weight-averaged bits per quantised weight (D/d)
    stored_bits: float | None  # with padding, scales, whitening and lattice matrices
    counts: dict[str, int]  # config name -> number of linears
    linears: int
    vram: list[tuple[int, int, int]]  # (ctx, KV cache bytes, total GPU bytes)
    settings: MemorySettings


def quantization(info: FolderInfo) -> Quantization:
    """Configs, bits and the VRAM table, from whatever the folder records."""
    per_linear = linear_configs(info)
    name = main_config(info, per_linear)
    default = None
    if name is not None:
        try:
            default = LatticeConfig.parse(name)
        except LatticeConfigError:
            default = None
    arch = _architecture(info)
    settings = _recipe_settings(info)
    counts = Counter(cfg.name for cfg in per_linear.values())
    bits: float | None = default.bits if default is not None and not per_linear else None
    stored_bits: float | None = None
    vram: list[tuple[int, int, int]] = []
    if arch is not None and (per_linear or default is not None):
        specs = linears(arch)
        covered = all((s.layer, s.kind) in per_linear for s in specs) or default is not None
        if covered:

            def config_for(spec: Any) -> LatticeConfig:
                found = per_linear.get((spec.layer, spec.kind), default)
                assert found is not None
                return found

            total = sum(s.params for s in specs)
            bits = sum(s.params * config_for(s).bits for s in specs) / total
            stored_bits = 8 * sum(quantized_bytes(arch, config_for).values()) / total
            limit = arch.max_position_embeddings or max(CONTEXTS)
            for ctx in [c for c in CONTEXTS if c <= limit] or [limit]:
                parts = model_breakdown(arch, config_for, replace(settings, ctx=ctx)).parts
                vram.append((ctx, parts["kv_cache"], sum(parts.values())))
    if bits is None and per_linear:
        bits = sum(cfg.bits for cfg in per_linear.values()) / len(per_linear)
    return Quantization(name, bits, stored_bits, dict(counts), len(per_linear), vram, settings)


def front_matter(info: FolderInfo, base: BaseInfo, quant: Quantization) -> dict[str, Any]:
    """The Hub metadata block, keys in the order the Hub's own cards use."""
    packed = (info.quantization_config or {}).get("quant_method") == "liftquant"
    tags = ["liftq", "liftquant", "quantized", "lattice-quantization"]
    if quant.bits is not None:
        tags.append(f"{quant.bits:.2f}-bit".replace(".00-bit", "-bit"))
    pipeline = base.pipeline_tag
    architectures = info.config.get("architectures") or []
    if pipeline is None and any(str(a).endswith("ForCausalLM") for a in architectures):
        pipeline = "text-generation"
    meta: dict[str, Any] = {}
    if base.repo_id:
        meta["base_model"] = base.repo_id
        meta["base_model_relation"] = "quantized"
    # A packed folder needs liftq's runtime; a quantize output holds plain (fake-quant) weights.
    meta["library_name"] = "liftq" if packed else "transformers"
    if pipeline:
        meta["pipeline_tag"] = pipeline
    if base.license:
        meta["license"] = base.license
    meta["tags"] = tags
    return meta


def _title(info: FolderInfo, base: BaseInfo, quant: Quantization) -> str:
    name = base.repo_id.split("/")[-1] if base.repo_id else info.folder.name
    what = quant.config or "LiftQuant"
    bits = f" ({quant.bits:.2f} bits)" if quant.bits is not None else ""
    return f"{name} · LiftQuant {what}{bits}"


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def eval_section(info: FolderInfo) -> list[str]:
    """The evaluation table and, for each eval run, its protocol line."""
    if not info.evals:
        return [
            "No evaluation was attached. Measure one with "
            "`liftq eval MODEL --ppl wikitext2 --kld-ref BASE --json > liftq_eval.json`.",
        ]
    lines = [
        "| model | text | perplexity | KL to base (nats/token) | top-1 agreement | tokens scored |",
        "|---|---|---:|---:|---:|---:|",
    ]
    protocols = []
    for run in info.evals:
        model = public_name(str(run.get("model", "?")))
        results = run.get("results", {})
        kld = run.get("kld", {}) or {}
        for text, ppl in run["ppl"].items():
            scored = (results.get(text) or {}).get("tokens_scored", "-")
            k = kld.get(text) or {}
            lines.append(
                f"| `{model}` | {text} | {_fmt(ppl)} | {_fmt(k.get('kl_mean'), 4)} | "
                f"{_fmt(k.get('top1_agreement'), 4)} | {scored} |"
            )
        p = run["protocol"]
        bos = "BOS + " if p.get("bos") else "no BOS, "
        line = (
            f"`{model}`: windows of ctx {p.get('ctx')} tokens, stride {p.get('stride')} "
            f"({p.get('windows', 'non-overlapping')}), {bos}{p.get('scored_per_window')} tokens "
            f"scored per window, first {p.get('max_tokens') or 'all'} tokens of each text"
        )
        if run.get("kld_ref"):
            line += (
                f"; KL(base ‖ model) and top-1 agreement against `{public_name(run['kld_ref'])}` "
                "on the same tokens"
            )
        sources = run.get("sources") or {}
        if sources:
            # File names only: a local path says nothing to a reader of the Hub page.
            named = {k: str(v).replace("\\", "/").rsplit("/", 1)[-1] for k, v in sources.items()}
            line += "; texts: " + ", ".join(f"{k} = {v}" for k, v in named.items())
        version = run.get("liftq_version")
        protocols.append(line + (f" (liftq {version})." if version else "."))
    return lines + [""] + [f"- {p}" for p in protocols]


def vram_section(quant: Quantization) -> list[str]:
    if not quant.vram:
        return ["Not computed: config.json or the per-linear configs were not readable."]
    s = quant.settings
    kv = "fp16" if s.kv_bits == 16 else f"{s.kv_bits}-bit"
    embed = "in host RAM" if s.embed == "host" else s.embed
    lines = [
        f"GPU memory predicted by liftq's planner (`liftq plan`) for batch {s.batch}, {kv} KV "
        f"cache, embeddings {embed}, lm_head {s.lm_head}, including "
        f"{format_bytes(s.cuda_context_bytes)} CUDA context and "
        f"{format_bytes(s.workspace_bytes)} workspace:",
        "",
        "| context (tokens) | KV cache | total GPU memory |",
        "|---:|---:|---:|",
    ]
    for ctx, kv_bytes, total in quant.vram:
        lines.append(f"| {ctx:,} | {format_bytes(kv_bytes)} | {format_bytes(total)} |")
    return lines


def _versions(info: FolderInfo) -> list[str]:
    qc = info.quantization_config or {}
    quant = info.quantize_meta
    packed = quant is not info.liftq  # liftq.json wraps the quantize metadata after a pack
    made = [f"quantised with {quant.get('liftq_version', 'unknown')}"]
    if packed:
        made.append(f"packed with {info.liftq.get('liftq_version', 'unknown')}")
    made.append(f"card written by {__version__}")
    rows = [f"| liftq version | {', '.join(made)} |"]
    if qc.get("quant_method"):
        rows.append(
            f"| packed format | `quantization_config.quant_method: {qc['quant_method']}`, "
            f"format_version {qc.get('format_version', '?')} |"
        )
    else:
        rows.append(
            "| packed format | none: de-quantised weights from `liftq quantize` "
            "(run `liftq pack` for the compact format) |"
        )
    if "format_version" in quant:
        rows.append(f"| quantised checkpoint format_version | {quant['format_version']} |")
    return rows


def render_card(
    info: FolderInfo,
    base: BaseInfo,
    repo_id: str | None = None,
    compare: list[str] | None = None,
) -> str:
    """README.md text: YAML front matter, then the sections described in the module doc;
    `compare` (hub/compare.compare_section) adds "How it compares" after the evaluation."""
    quant = quantization(info)
    meta = front_matter(info, base, quant)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()
    base_link = (
        f"[{base.repo_id}](https://huggingface.co/{base.repo_id})"
        if base.repo_id
        else "an unnamed base model (push with `--base-model owner/name` to link it)"
    )
    out = [f"---\n{head}\n---", "", f"# {_title(info, base, quant)}", ""]
    out.append(
        f"{base_link} compressed with **LiftQuant** lattice quantisation by "
        "liftq: every d-dimensional slice of a whitened "
        "weight row is stored as D sign bits `q` and decoded as `s · M q`, so a layer costs "
        "D/d bits per weight."
    )
    out += ["", "## Quantisation", "", "| | |", "|---|---|"]
    out.append(f"| base model | {base.repo_id or 'unknown'} |")
    if quant.config:
        scope = "every decoder linear" if len(quant.counts) <= 1 else "default"
        out.append(f"| lattice config | {quant.config} ({scope}) |")
    if len(quant.counts) > 1:
        mix = ", ".join(f"{n} × {c}" for c, n in sorted(quant.counts.items()))
        out.append(f"| per-linear configs | {mix} |")
    if quant.bits is not None:
        out.append(f"| bits per quantised weight (D/d) | {quant.bits:.3f} |")
    if quant.stored_bits is not None:
        out.append(
            f"| stored bits per weight (codes, scales, whitening, lattice matrices) | "
            f"{quant.stored_bits:.3f} |"
        )
    calib = info.quantize_meta.get("calibration") or {}
    if calib:
        out.append(
            f"| calibration | {calib.get('source')}: {calib.get('nsamples')} windows × "
            f"{calib.get('seqlen')} tokens, seed {calib.get('seed')} |"
        )
    out += _versions(info)
    out.append(f"| license | {base.license or 'see the base model'} |")
    out += ["", "## Evaluation", ""] + eval_section(info)
    if compare:
        out += ["", "## How it compares", ""] + compare
    out += ["", "## GPU memory", ""] + vram_section(quant)
    recipe = info.recipe_text
    out += ["", "## Recipe", ""]
    if recipe is not None:
        out += ["```yaml", public_recipe(recipe, base.repo_id).rstrip("\n"), "```"]
    else:
        out.append("No recipe recorded (quantised with `--bits` or `--config`).")
    target = repo_id or "owner/name"
    out += ["", "## Use", ""] + use_section(target)
    return "\n".join(out)
