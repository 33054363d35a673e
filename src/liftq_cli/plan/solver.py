"""Budget solver: the catalog lattice configs that fill a VRAM budget.

Uniform: every quantized linear at one catalog config, the highest-bit one whose total
(`memory.model_breakdown`) fits. At equal bits the config with the larger slice dimension d
comes first (the catalog's own order), so each bit level has one representative.

Mixed: each (layer, linear kind) group gets its own level, chosen by the allocator that
`quantize --mixed` uses too (plan/allocation.py: Lagrangian relaxation, then a greedy fill):
it minimises the predicted error `sum_g s_g * n_g * 2^(-2 b_g)` for groups of n_g weights with
sensitivity s_g (the high-rate distortion of a b-bit quantizer falls as 2^(-2b)) with the
packed bytes within the budget. The last affordable upgrade is one group's 0.1-bit step, so the
budget is used to well within 1% unless every group reached the top config; the result is
never below the best uniform level.

Sensitivities come from a file (`parse_sensitivity`) or the documented prior
(`prior_sensitivity`): v_proj and down_proj weigh 2x, o_proj 1.25x, and the first and last
blocks 2x, the other blocks within 10% of either end 1.5x. Kinds the table does not name
(Phi-3's fused qkv_proj / gate_up_proj, latent attention's q_a/q_b/kv_a/kv_b, linear
attention's in_proj_* / out_proj) weigh 1.0: no measurement backs another number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from liftq_cli.errors import BadInputError, DoesNotFitError
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.plan.allocation import choose
from liftq_cli.plan.architectures import LINEAR_KINDS, Architecture, LinearSpec, linears
from liftq_cli.plan.memory import (
    Breakdown,
    MemorySettings,
    fixed_bytes,
    format_bytes,
    lattice_matrix_bytes,
    model_breakdown,
    packed_linear_bytes,
    uniform,
)

KIND_PRIOR: dict[str, float] = {  # a kind not listed: 1.0
    "q_proj": 1.0,
    "k_proj": 1.0,
    "v_proj": 2.0,
    "o_proj": 1.25,
    "gate_proj": 1.0,
    "up_proj": 1.0,
    "down_proj": 2.0,
    "shared_gate_proj": 1.0,
    "shared_up_proj": 1.0,
    "shared_down_proj": 2.0,
}
EDGE_LAYER_PRIOR = 2.0  # first and last block
NEAR_EDGE_LAYER_PRIOR = 1.5  # other blocks within 10% of either end
ALTERNATIVES_EACH_SIDE = 2


@dataclass(frozen=True)
class Candidate:
    """One uniform config priced against the budget."""

    config: LatticeConfig
    total_bytes: int
    vram_bytes: int

    @property
    def headroom_bytes(self) -> int:
        return self.vram_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.vram_bytes


@dataclass(frozen=True)
class Plan:
    """The solver's answer: configs per linear, the memory they need and the alternatives."""

    arch: Architecture
    settings: MemorySettings
    vram_bytes: int
    assignment: dict[str, LatticeConfig]  # linear name (layers.N.kind) -> config
    breakdown: Breakdown
    mixed: bool = False
    alternatives: list[Candidate] = field(default_factory=list)

    def config_for(self, spec: LinearSpec) -> LatticeConfig:
        return self.assignment[spec.name]

    @property
    def configs_used(self) -> list[LatticeConfig]:
        return sorted(set(self.assignment.values()), key=lambda c: (c.bits, -c.d))

    @property
    def config(self) -> LatticeConfig | None:
        """The single config of a uniform plan (None when several are used)."""
        used = self.configs_used
        return used[0] if len(used) == 1 else None

    @property
    def bits(self) -> float:
        """Weight-averaged bits per quantized weight (excluding scales and factors)."""
        if self.config is not None:
            return self.config.bits
        specs = linears(self.arch)
        total = sum(spec.params for spec in specs)
        return sum(spec.params * self.assignment[spec.name].bits for spec in specs) / total

    @property
    def total_bytes(self) -> int:
        return self.breakdown.total

    @property
    def headroom_bytes(self) -> int:
        return self.vram_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.vram_bytes


def catalog_ladder(configs: Sequence[LatticeConfig] = CATALOG_CONFIGS) -> list[LatticeConfig]:
    """One config per distinct bit level, ascending; at equal bits the larger d wins."""
    best: dict[float, LatticeConfig] = {}
    for cfg in configs:
        key = round(cfg.bits, 9)
        if key not in best or cfg.d > best[key].d:
            best[key] = cfg
    return [best[key] for key in sorted(best)]


def _describe(settings: MemorySettings) -> str:
    kv = "fp16" if settings.kv_bits == 16 else f"{settings.kv_bits}-bit"
    return (
        f"ctx {settings.ctx} x batch {settings.batch}, {kv} KV, embed {settings.embed}, "
        f"lm_head {settings.lm_head}"
    )


def _does_not_fit(
    arch: Architecture, vram: int, lowest: Candidate, settings: MemorySettings
) -> DoesNotFitError:
    return DoesNotFitError(
        f"{arch.name} does not fit in {format_bytes(vram)}: even {lowest.config.name} "
        f"({lowest.config.bits:.1f} bits) needs {format_bytes(lowest.total_bytes)}, so the "
        f"minimum is --vram {math.ceil(lowest.total_bytes / 1e7) / 100:.2f}GB with "
        f"{_describe(settings)}; raise --vram or lower "
        f"--ctx / --kv-bits / --embed / --lm-head"
    )


def uniform_candidates(
    arch: Architecture,
    vram_bytes: int,
    settings: MemorySettings,
    configs: Sequence[LatticeConfig] = CATALOG_CONFIGS,
) -> list[Candidate]:
    """Every ladder level priced as a uniform plan, ascending bits."""
    return [
        Candidate(cfg, model_breakdown(arch, uniform(cfg), settings).total, vram_bytes)
        for cfg in catalog_ladder(configs)
    ]


def _alternatives(candidates: list[Candidate], center: float) -> list[Candidate]:
    below = [c for c in candidates if c.config.bits < center - 1e-9]
    above = [c for c in candidates if c.config.bits > center + 1e-9]
    return below[-ALTERNATIVES_EACH_SIDE:][::-1] + above[:ALTERNATIVES_EACH_SIDE]


def plan_uniform(
    arch: Architecture,
    vram_bytes: int,
    settings: MemorySettings,
    configs: Sequence[LatticeConfig] = CATALOG_CONFIGS,
) -> Plan:
    """The highest-bit catalog config that fits `vram_bytes` with every linear at it.

    Raises `DoesNotFitError` naming the VRAM the lowest config needs when nothing fits.
    """
    candidates = uniform_candidates(arch, vram_bytes, settings, configs)
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        raise _does_not_fit(arch, vram_bytes, candidates[0], settings)
    pick = fitting[-1].config
    return Plan(
        arch=arch,
        settings=settings,
        vram_bytes=vram_bytes,
        assignment={spec.name: pick for spec in linears(arch)},
        breakdown=model_breakdown(arch, uniform(pick), settings),
        mixed=False,
        alternatives=_alternatives(candidates, pick.bits),
    )


def prior_sensitivity(arch: Architecture) -> dict[str, float]:
    """The documented prior: kind weight x layer weight for every linear name."""
    near = max(1, math.ceil(0.1 * arch.num_layers))
    result = {}
    for spec in linears(arch):
        edge = min(spec.layer, arch.num_layers - 1 - spec.layer)
        layer_weight = (
            EDGE_LAYER_PRIOR if edge == 0 else NEAR_EDGE_LAYER_PRIOR if edge < near else 1.0
        )
        result[spec.name] = KIND_PRIOR.get(spec.kind, 1.0) * layer_weight
    return result


_HF_NAME = re.compile(
    r"^(?:model\.)?(?:language_model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)$"
)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInputError(f"sensitivity {where} = {value!r} must be a positive number")
    if not math.isfinite(value) or value <= 0:
        raise BadInputError(f"sensitivity {where} = {value!r} must be a positive finite number")
    return float(value)


def parse_sensitivity(arch: Architecture, data: Any) -> dict[str, float]:
    """Validate a sensitivity mapping and expand it to one weight per linear name.

    Schema (YAML or JSON; every section optional):
        format_version: 1
        default: 1.0                      # weight of a linear not listed below
        kinds:   {down_proj: 2.0}         # multiplies every layer's linear of that kind
        layers:  {0: 3.0, 79: 2.0}        # multiplies every linear of that block
        linears: {layers.0.q_proj: 1.7}   # absolute weight (HF names like
                                          # model.layers.0.self_attn.q_proj also accepted)
    """
    if not isinstance(data, Mapping):
        raise BadInputError("sensitivity file must be a mapping with kinds/layers/linears")
    unknown = set(data) - {"format_version", "default", "kinds", "layers", "linears"}
    if unknown:
        raise BadInputError(
            f"sensitivity file has unknown key(s) {', '.join(sorted(map(str, unknown)))}: "
            f"use format_version, default, kinds, layers, linears"
        )
    if data.get("format_version", 1) != 1:
        raise BadInputError(
            f"sensitivity format_version {data['format_version']!r} is not supported: use 1"
        )
    default = _weight(data.get("default", 1.0), "default")
    sections = {key: data.get(key) or {} for key in ("kinds", "layers", "linears")}
    for key, section in sections.items():
        if not isinstance(section, Mapping):
            raise BadInputError(f"sensitivity '{key}' must be a mapping, got {section!r}")
    kinds: dict[str, float] = {}
    for kind, value in sections["kinds"].items():
        if kind not in LINEAR_KINDS:
            raise BadInputError(
                f"sensitivity kind '{kind}' is unknown: use one of {', '.join(LINEAR_KINDS)}"
            )
        kinds[kind] = _weight(value, f"kinds.{kind}")
    layers: dict[int, float] = {}
    for layer, value in sections["layers"].items():
        index = int(layer) if str(layer).isdigit() else -1
        if not 0 <= index < arch.num_layers:
            raise BadInputError(
                f"sensitivity layer '{layer}' is out of range: {arch.name} has layers "
                f"0..{arch.num_layers - 1}"
            )
        layers[index] = _weight(value, f"layers.{layer}")
    names = {spec.name for spec in linears(arch)}
    explicit: dict[str, float] = {}
    for name, value in sections["linears"].items():
        match = _HF_NAME.match(str(name))
        canonical = f"layers.{match.group(1)}.{match.group(2)}" if match else str(name)
        if canonical not in names:
            raise BadInputError(
                f"sensitivity linear '{name}' is not a quantized linear of {arch.name}: use "
                f"names like layers.0.q_proj"
            )
        explicit[canonical] = _weight(value, f"linears.{name}")
    return {
        spec.name: explicit.get(
            spec.name, default * kinds.get(spec.kind, 1.0) * layers.get(spec.layer, 1.0)
        )
        for spec in linears(arch)
    }


def _group_bytes(spec: LinearSpec, cfg: LatticeConfig) -> int:
    return sum(packed_linear_bytes(spec.out_features, spec.in_features, cfg).values()) * spec.count


def plan_mixed(
    arch: Architecture,
    vram_bytes: int,
    settings: MemorySettings,
    sensitivity: Mapping[str, float] | None = None,
    configs: Sequence[LatticeConfig] = CATALOG_CONFIGS,
) -> Plan:
    """Per-(layer, kind) catalog configs that fill `vram_bytes` (see the module docstring).

    `sensitivity` maps every linear name to a positive weight (default: `prior_sensitivity`).
    Raises `DoesNotFitError` when even the lowest config everywhere does not fit.
    """
    ladder = catalog_ladder(configs)
    weights = dict(sensitivity) if sensitivity is not None else prior_sensitivity(arch)
    specs = linears(arch)
    cost = {g: [_group_bytes(spec, cfg) for cfg in ladder] for g, spec in enumerate(specs)}
    loss = {
        g: [weights[spec.name] * spec.params * 2.0 ** (-2 * cfg.bits) for cfg in ladder]
        for g, spec in enumerate(specs)
    }
    candidates = uniform_candidates(arch, vram_bytes, settings, configs)
    available = vram_bytes - sum(fixed_bytes(arch, settings).values())

    def spent(choice: dict) -> int:
        used = {ladder[j] for j in choice.values()}
        return sum(cost[g][j] for g, j in choice.items()) + sum(map(lattice_matrix_bytes, used))

    def solve(start: dict | None = None) -> dict | None:
        """The allocator's choice with the budget net of the lattice matrices it uses (a few
        kB, shared by a config's groups, so not separable): reserve what the last choice
        used until the choice fits; at worst every ladder matrix."""
        reserve = 0
        for _ in range(4):
            choice = choose(cost, loss, available - reserve, start)
            if choice is None or spent(choice) <= available:
                return choice
            reserve = spent(choice) - sum(cost[g][j] for g, j in choice.items())
        return choose(cost, loss, available - sum(map(lattice_matrix_bytes, ladder)), start)

    choice = solve()
    if choice is None:
        raise _does_not_fit(arch, vram_bytes, candidates[0], settings)

    def mean_bits(choice: dict) -> float:
        total = sum(spec.params for spec in specs)
        return sum(spec.params * ladder[choice[g]].bits for g, spec in enumerate(specs)) / total

    uniform = [c for c in candidates if c.fits]  # candidates are priced on `ladder`
    if uniform and mean_bits(choice) < uniform[-1].config.bits:
        # Never below the best uniform level: upgrade from it instead.
        top = ladder.index(uniform[-1].config)
        start = dict.fromkeys(range(len(specs)), top)
        if spent(start) <= available:
            choice = solve(start) or choice
    level = [choice[g] for g in range(len(specs))]
    assignment = {spec.name: ladder[level[g]] for g, spec in enumerate(specs)}
    breakdown = model_breakdown(arch, lambda spec: assignment[spec.name], settings)
    plan = Plan(arch, settings, vram_bytes, assignment, breakdown, mixed=True)
    assert plan.fits, "mixed plan exceeds its budget"  # internal invariant of the greedy
    alternatives = _alternatives(candidates, plan.bits)
    return Plan(arch, settings, vram_bytes, assignment, breakdown, True, alternatives)
