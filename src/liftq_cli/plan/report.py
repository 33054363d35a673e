"""Outputs of a plan: the rich tables, the --json payload (the recipe is `recipe.from_plan`).

Pure functions of a `Plan`: they build objects (tables, dicts); the CLI prints or
writes them.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from liftq_cli.plan.architectures import (
    Architecture,
    Preset,
    active_param_count,
    linears,
    param_count,
    presets,
)
from liftq_cli.plan.memory import (
    ASSUMPTION_NOTES,
    format_bytes,
    packed_linear_bytes,
    settings_assumptions,
)
from liftq_cli.plan.solver import Plan


def _labels(plan: Plan) -> dict[str, str]:
    s = plan.settings
    kv = "fp16" if s.kv_bits == 16 else f"{s.kv_bits}-bit"
    embed = "host RAM, not on the GPU" if s.embed == "host" else s.embed
    lm_head = s.lm_head
    if plan.arch.tie_embeddings and s.embed == s.lm_head:
        embed, lm_head = f"{s.embed}, tied: also the lm_head", "tied: the embeddings"
    elif plan.arch.tie_embeddings:
        lm_head = f"{s.lm_head}, its own copy of the tied embeddings"
    return {
        "codes": "lattice codes (D sign bits per d-slice)",
        "scales": "per-row scales (fp16)",
        "whitening": "whitening factors s1, s2, P1, P2 (fp16)",
        "lattice_matrices": "lattice matrices M (fp32)",
        "embed": f"embeddings ({embed})",
        "lm_head": f"lm_head ({lm_head})",
        "norms_biases": "norms, biases, routers (fp16)",
        "kv_cache": f"KV cache (ctx {s.ctx} x batch {s.batch}, {kv})",
        "linear_state": f"linear-attention state (batch {s.batch}, fp16)",
        "cuda_context": "CUDA context",
        "workspace": "workspaces + allocator slack",
        "activations": f"activations (prefill chunk {min(s.prefill_chunk, s.ctx)})",
        "overhead": "runtime overhead (--overhead)",
    }


def config_label(plan: Plan) -> str:
    cfg = plan.config
    return cfg.name if cfg is not None else "mixed"


def breakdown_table(plan: Plan) -> Table:
    """Memory by part, the total against the budget and the headroom."""
    cfg = plan.config
    pick = f"{cfg.name} ({cfg.bits:.2f} bits)" if cfg else f"mixed ({plan.bits:.3f} bits avg)"
    table = Table(title=f"{plan.arch.name} at {pick} on {format_bytes(plan.vram_bytes)}")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("GB", justify="right")
    table.add_column("share", justify="right")
    labels = _labels(plan)
    total = plan.total_bytes
    for key, value in plan.breakdown.parts.items():
        share = f"{100 * value / total:.1f}%" if total else "-"
        table.add_row(labels.get(key, key), f"{value:,}", f"{value / 1e9:.3f}", share)
    table.add_section()
    table.add_row("[bold]total[/]", f"[bold]{total:,}[/]", f"[bold]{total / 1e9:.3f}[/]", "")
    table.add_row("budget (--vram)", f"{plan.vram_bytes:,}", f"{plan.vram_bytes / 1e9:.3f}", "")
    color = "green" if plan.fits else "red"
    head = plan.headroom_bytes
    table.add_row(f"[{color}]headroom[/]", f"[{color}]{head:,}[/]", f"{head / 1e9:.3f}", "")
    return table


def experts_summary(plan: Plan) -> dict[str, Any] | None:
    """A mixture of experts' routing and parameter counts (None for a dense model).

    Every expert is resident on the GPU, so the memory above prices them all; `active_params`
    is what one token runs through (embeddings counted, see `active_param_count`).
    """
    arch = plan.arch
    if not arch.is_moe:
        return None
    routed = [spec for spec in linears(arch) if spec.routed]
    packed = sum(
        sum(packed_linear_bytes(s.out_features, s.in_features, plan.config_for(s)).values())
        * s.count
        for s in routed
    )
    return {
        "num_experts": arch.num_experts,
        "experts_per_token": arch.experts_per_token,
        "shared_expert_intermediate_size": arch.shared_expert_intermediate_size,
        "moe_layers": arch.moe_layers,
        "dense_layers": list(arch.dense_layers),
        "routed_expert_params": sum(spec.params for spec in routed),
        "routed_expert_bytes": packed,
        "total_params": param_count(arch),
        "active_params": active_param_count(arch),
    }


def experts_table(plan: Plan) -> Table | None:
    """Experts of an MoE model: how many, how many run per token, total vs active params."""
    info = experts_summary(plan)
    if info is None:
        return None
    arch = plan.arch
    table = Table(title="experts (every expert resident on the GPU, priced above)")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("routed experts per MoE block", str(info["num_experts"]))
    table.add_row("routed experts per token", str(info["experts_per_token"]))
    shared = info["shared_expert_intermediate_size"]
    table.add_row("shared expert (every token)", f"width {shared}" if shared else "none")
    dense = f" (dense: {_ranges(arch.dense_layers)})" if arch.dense_layers else ""
    table.add_row("MoE blocks", f"{info['moe_layers']} of {arch.num_layers}{dense}")
    share = info["routed_expert_params"] / sum(spec.params for spec in linears(arch))
    table.add_row(
        "routed expert weights",
        f"{info['routed_expert_params'] / 1e9:.2f}B params, "
        f"{format_bytes(info['routed_expert_bytes'])} packed ({100 * share:.1f}% of linears)",
    )
    table.add_row("parameters, total (all experts)", f"{info['total_params'] / 1e9:.2f}B")
    table.add_row(
        "parameters, active per token", f"{info['active_params'] / 1e9:.2f}B (embeddings counted)"
    )
    return table


def _ranges(layers: tuple[int, ...]) -> str:
    """'0-2, 5' for (0, 1, 2, 5)."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def alternatives_table(plan: Plan) -> Table:
    """The uniform configs just below and above the pick."""
    table = Table(title="alternatives (uniform)")
    for name, justify in (("config", "left"), ("bits", "right"), ("total GB", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("headroom GB", justify="right")
    table.add_column("fits")
    for alt in sorted(plan.alternatives, key=lambda a: -a.config.bits):
        table.add_row(
            alt.config.name,
            f"{alt.config.bits:.2f}",
            f"{alt.total_bytes / 1e9:.3f}",
            f"{alt.headroom_bytes / 1e9:+.3f}",
            "yes" if alt.fits else "[red]no[/]",
        )
    return table


def mix_table(plan: Plan) -> Table:
    """How many linears (and weights) each config covers in a mixed plan."""
    table = Table(title="configs used")
    table.add_column("config")
    table.add_column("bits", justify="right")
    table.add_column("linears", justify="right")
    table.add_column("weights", justify="right")
    specs = linears(plan.arch)
    total = sum(spec.params for spec in specs)
    for cfg in plan.configs_used:
        chosen = [s for s in specs if plan.assignment[s.name] == cfg]
        weight = sum(s.params for s in chosen)
        table.add_row(cfg.name, f"{cfg.bits:.2f}", str(len(chosen)), f"{100 * weight / total:.1f}%")
    return table


def assumptions(
    plan: Plan, vram_text: str | None = None, sensitivity: str | None = None
) -> dict[str, Any]:
    """Every setting the plan used (defaults included) with what it stands for."""
    values: dict[str, Any] = settings_assumptions(plan.settings)
    values["vram"] = {
        "given": vram_text if vram_text is not None else str(plan.vram_bytes),
        "bytes": plan.vram_bytes,
        "units": "GB/MB = 10^9/10^6 bytes; GiB/MiB and a bare G/M = 2^30/2^20 bytes",
    }
    values["host_bytes"] = plan.breakdown.host_bytes
    values["notes"] = dict(ASSUMPTION_NOTES)
    source = sensitivity or "the prior (v_proj/down_proj 2x, o_proj 1.25x, edge blocks 2x)"
    values["solver"] = (
        "mixed: catalog config per (layer, kind), greedy on expected error reduction per byte, "
        f"sensitivity from {source}"
        if plan.mixed
        else "uniform: the highest-bit catalog config that fits"
    )
    return values


def assumption_lines(plan: Plan, vram_text: str | None = None) -> list[str]:
    """Short human lines stating the defaults under the table."""
    s = plan.settings
    kv = "fp16" if s.kv_bits == 16 else f"{s.kv_bits}-bit"
    lines = [
        f"assumes: ctx {s.ctx}, batch {s.batch}, {kv} KV cache, embeddings {s.embed}"
        + (f" ({format_bytes(plan.breakdown.host_bytes)} in host RAM)" if s.embed == "host" else "")
        + f", lm_head {s.lm_head}",
    ]
    if s.overhead_bytes is None:
        lines.append(
            f"runtime: CUDA context {s.cuda_context_bytes / 2**20:.0f} MiB (an estimate), "
            f"workspace {s.workspace_bytes / 2**20:.0f} MiB, prefill chunk {s.prefill_chunk} "
            f"tokens; override with --overhead or --cuda-context/--workspace/--prefill-chunk"
        )
    else:
        lines.append(f"runtime overhead: {format_bytes(s.overhead_bytes)} (--overhead)")
    given = vram_text or str(plan.vram_bytes)
    lines.append(f"--vram {given} = {plan.vram_bytes:,} bytes (GB = 10^9; GiB and bare G = 2^30)")
    if given.strip().lower().endswith("gb"):
        gib = plan.vram_bytes / 1e9
        lines.append(
            f"note: GPUs sold as {gib:g} GB have {gib:g} GiB ({gib * 2**30 / 1e9:.2f} GB); "
            f"pass --vram {gib:g}GiB to plan for all of it"
        )
    return lines


def plan_payload(
    plan: Plan, model_ref: str, vram_text: str | None = None, sensitivity: str | None = None
) -> dict[str, Any]:
    """The --json object: config, bits, bytes (total + breakdown), fit, alternatives, defaults."""
    payload: dict[str, Any] = {
        "model": plan.arch.name,
        "model_ref": model_ref,
        "source": plan.arch.source,
        "params": param_count(plan.arch),
        "active_params": active_param_count(plan.arch),
        "config": config_label(plan),
        "bits": round(plan.bits, 6),
        "mixed": plan.mixed,
        "bytes": {"total": plan.total_bytes, "breakdown": dict(plan.breakdown.parts)},
        "vram_bytes": plan.vram_bytes,
        "fits": plan.fits,
        "headroom_bytes": plan.headroom_bytes,
        "alternatives": [
            {
                "config": alt.config.name,
                "bits": round(alt.config.bits, 6),
                "total_bytes": alt.total_bytes,
                "headroom_bytes": alt.headroom_bytes,
                "fits": alt.fits,
            }
            for alt in sorted(plan.alternatives, key=lambda a: -a.config.bits)
        ],
        "assumptions": assumptions(plan, vram_text, sensitivity),
    }
    experts = experts_summary(plan)
    if experts is not None:
        payload["experts"] = experts
    if plan.mixed:
        payload["configs"] = {name: cfg.name for name, cfg in plan.assignment.items()}
    return payload


def _row(preset: Preset, arch: Architecture) -> dict[str, Any]:
    return {
        "name": preset.name,
        "aliases": list(preset.aliases),
        "hf_id": preset.hf_id,
        "params": param_count(arch),
        "published_params": preset.published_params,
        "active_params": active_param_count(arch),
        "published_active_params": preset.published_active_params,
        "layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "experts": arch.num_experts,
        "tied_embeddings": arch.tie_embeddings,
    }


def models_payload() -> list[dict[str, Any]]:
    """One row per shipped preset (for --list-models)."""
    return [_row(preset, preset.architecture()) for preset in presets().values()]


def models_table() -> Table:
    table = Table(title="models with presets (also: a folder with config.json, or a hub id)")
    for name in ("name", "aliases", "params", "layers", "hidden", "hub id"):
        table.add_column(
            name, justify="right" if name in ("params", "layers", "hidden") else "left"
        )
    for row in models_payload():
        experts = f" ({row['experts']} experts)" if row["experts"] else ""
        table.add_row(
            row["name"],
            ", ".join(row["aliases"]),
            f"{row['params'] / 1e9:.3f}B",
            str(row["layers"]),
            f"{row['hidden_size']}{experts}",
            row["hf_id"],
        )
    return table
