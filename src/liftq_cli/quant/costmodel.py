"""Cost model of the block stage: work per stage from the shapes, seconds from coefficients.

One decoder block, T = nsamples * seqlen tokens, L = seqlen, B = correction.batch windows a
step, N = nsamples; each linear has o outputs, n inputs, Kronecker factors a * b = n, lattice
LQ-D/d and search beam K; P is the block's linear parameters (MoE: the active share):

    stats    2 T n^2                                   fp64 flop per distinct input (q/k/v
                                                       share one, gate/up share one)
             + [compensate] 2 T o n                    per linear (its cross sum y_f^T x;
                                                       not routed experts)
    whiten   A (4 o n^2 + 4 o n (a+b)) + S (6 o n^2 + 12 o n (a+b))   fp32 flop: A proxy
             evaluations (1 AWQ exponent with LDLQ, else 4), S = whiten_steps Adam steps
    encode   o ceil(n/d) K D                           search units (beam x levels per slice)
    ldlq     16/3 n^3 + 2 n^2 (a+b) + 5 o n^2 + d n^2/2   fp64 flop (0 without --ldlq)
             + [compensate] n^3/3 + 4 o n^2            (its target's ridge solve)
    forward  p F(T) + [sequential] ceil(N/B) R         fp32 flop, p = 1 + [sequential] + s
                                                       passes (targets, next inputs, and the
                                                       s statistics passes of
                                                       cost_inputs.stats_passes)
    correct  steps (3 F(B L) + 3 R) + 2 (F(T) + ceil(N/B) R)   fp32 flop (Adam steps, and the
                                                       MSE before and after)
    comm     bytes / link bandwidth (only with several processes)

with F(t) = 2 t P + 2 t L q_dim (causal attention) the flops of a forward pass over t tokens
and R = sum 2 o ceil(n/d) d D + 2 o n (a+b) + 3 o n the flops of reconstructing every weight.

Seconds = units x a coefficient (seconds per unit) per stage and device kind, all in
`cost_coefficients.json` beside this module. With W processes, whiten + encode + LDLQ of the
linears are spread over the ranks by cost (`assign`, as the block stage does; the fullest
rank counts), stats and forwards split by calibration windows (ceil(N/W) each), and
correction runs on rank 0 over every window, MSE passes included (not split: its gradients
then sum as one process's do, so the codes match bit for bit). Communication
(`comm_bytes`): Gram tree nodes to the owners, encoded linears from them, the streams
gathered on rank 0 and the trained parameters broadcast from it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from liftq_cli.io.packed_format import whitening_factors, words_per_row
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import Architecture, layer_linears
from liftq_cli.quant.cost_inputs import distinct_inputs, stats_passes
from liftq_cli.quantize_job import QuantizeSettings

STAGES = ("stats", "whiten", "encode", "ldlq", "forward", "correct", "comm")
UNITS = {"stats": "fp64 flop", "whiten": "fp32 flop", "encode": "search unit"}
UNITS |= {"ldlq": "fp64 flop", "forward": "fp32 flop", "correct": "fp32 flop", "comm": "byte"}
COEFFICIENTS_FILE = "cost_coefficients.json"  # every coefficient and datasheet, in one place


@functools.cache
def tables() -> dict[str, Any]:
    """cost_coefficients.json: measured CPU seconds per unit, GPU datasheets, efficiencies."""
    text = resources.files("liftq_cli.quant").joinpath(COEFFICIENTS_FILE).read_text()
    return json.loads(text)


@dataclass(frozen=True)
class Coefficients:
    """Seconds per unit of work of every stage on one device kind."""

    kind: str
    seconds: Mapping[str, float]
    source: str
    measured_here: bool = False  # fitted to stage times measured on this very device


def kind_from_name(name: str) -> str:
    """A device kind from a device name: 'NVIDIA H100 80GB HBM3' -> 'h100'; cpu -> 'cpu'."""
    upper = name.upper()
    if upper == "CPU":
        return "cpu"
    for key, kind in (("H200", "h200"), ("H100", "h100"), ("A100", "a100"), ("4090", "rtx4090")):
        if key in upper:
            return kind
    return "cuda"


def coefficients_for(kind: str, tf32: bool = True) -> Coefficients:
    """Default coefficients: measured for cpu; for a GPU kind 1 / (datasheet peak x assumed
    efficiency) per stage (search units at `search_flop_per_unit` fp32 flop each)."""
    table = tables()
    if kind == "cpu":
        return Coefficients("cpu", dict(table["cpu"]["seconds"]), table["cpu"]["source"])
    sheet = table["gpus"].get(kind, table["gpus"]["cuda"])
    matmul = sheet["tf32" if tf32 else "fp32"]
    peak = {"stats": sheet["fp64"], "ldlq": sheet["fp64"], "whiten": matmul, "forward": matmul}
    peak |= {"correct": matmul, "encode": sheet["fp32"] / table["search_flop_per_unit"]}
    seconds = {stage: 1 / (peak[stage] * table["efficiency"][stage]) for stage in peak}
    seconds["comm"] = 1 / sheet["link"]
    name = kind if kind in table["gpus"] else "cuda (an unknown GPU)"
    return Coefficients(kind, seconds, f"{name} datasheet x assumed efficiency")


@dataclass(frozen=True)
class LinearWork:
    """One linear kind of a block: `count` matrices (o, n) at `cfg`, encoded at `beam`."""

    kind: str
    out: int
    inp: int
    cfg: LatticeConfig
    beam: int
    count: int = 1
    share: float = 1.0  # tokens it sees / all tokens (MoE experts: k / E)


def _catalog_beam(cfg: LatticeConfig) -> int:
    from liftq_cli.quant.lattice_catalog import catalog_search

    return catalog_search(cfg).beam


def block_work(
    arch: Architecture,
    layer: int,
    config_for: Callable[[int, str], LatticeConfig],
    beam: Callable[[LatticeConfig], int] = _catalog_beam,
) -> list[LinearWork]:
    """The linears of block `layer` with their configs and search beams."""
    share = arch.experts_per_token / arch.num_experts if arch.is_moe else 1.0
    work = []
    for s in layer_linears(arch, layer):
        cfg = config_for(layer, s.kind)
        lin_share = share if s.count > 1 else 1.0
        work.append(
            LinearWork(s.kind, s.out_features, s.in_features, cfg, beam(cfg), s.count, lin_share)
        )
    return work


def recon_flops(lin: LinearWork) -> float:
    """Flops of reconstructing one weight: signs @ M^T, the Kronecker unwhitening, scales."""
    o, n, cfg = lin.out, lin.inp, lin.cfg
    a, b = whitening_factors(n)
    return lin.count * (2 * o * -(-n // cfg.d) * cfg.d * cfg.D + 2 * o * n * (a + b) + 3 * o * n)


def linear_stage_units(lin: LinearWork, settings: QuantizeSettings) -> dict[str, float]:
    """Units of whiten, encode and ldlq for one linear kind (see the module docstring)."""
    o, n, cfg = lin.out, lin.inp, lin.cfg
    a, b = whitening_factors(n)
    alphas = 1 if settings.ldlq else 4
    steps = settings.whiten_steps
    whiten = alphas * (4 * o * n * n + 4 * o * n * (a + b))
    whiten += steps * (6 * o * n * n + 12 * o * n * (a + b))
    encode = o * -(-n // cfg.d) * lin.beam * cfg.D
    ldlq = 0.0
    if settings.ldlq:
        ldlq = 16 / 3 * n**3 + 2 * n * n * (a + b) + 5 * o * n * n + cfg.d * n * n / 2
    if settings.compensate:
        ldlq += n**3 / 3 + 4 * o * n * n
    return {k: lin.count * v for k, v in (("whiten", whiten), ("encode", encode), ("ldlq", ldlq))}


def forward_flops(
    work: Sequence[LinearWork], arch: Architecture, tokens: int, seqlen: int
) -> float:
    """F(t): one forward pass of the block over `tokens` tokens in windows of `seqlen`."""
    params = sum(lin.out * lin.inp * lin.count * lin.share for lin in work)
    return 2 * tokens * params + 2 * tokens * seqlen * arch.q_dim


def shared_stage_units(
    work: Sequence[LinearWork], arch: Architecture, settings: QuantizeSettings, world: int = 1
) -> dict[str, float]:
    """Units of stats, forward and correct for one block on one of `world` ranks."""
    calib, corr = settings.calibration, settings.correction
    windows = -(-calib.nsamples // world)
    tokens = windows * calib.seqlen
    recon = sum(recon_flops(lin) for lin in work)
    batches = -(-windows // corr.batch)
    stats = sum(
        2 * tokens * share * n * n * count for n, count, share in distinct_inputs(work).values()
    )
    if settings.compensate:  # each linear's y_f^T x (routed experts are not measured)
        stats += sum(2 * tokens * x.count * x.out * x.inp for x in work if x.share == 1.0)
    full = forward_flops(work, arch, tokens, calib.seqlen)
    forward = (stats_passes(work, settings) + (2 if settings.sequential else 1)) * full
    forward += batches * recon if settings.sequential else 0
    step = forward_flops(work, arch, corr.batch * calib.seqlen, calib.seqlen)
    # rank 0 corrects over every window (its MSE passes too), so world does not divide it
    every = forward_flops(work, arch, calib.nsamples * calib.seqlen, calib.seqlen)
    all_batches = -(-calib.nsamples // corr.batch)
    correct = corr.steps * (3 * step + 3 * recon) + 2 * (every + all_batches * recon)
    return {"stats": stats, "forward": forward, "correct": correct}


def state_bytes(lin: LinearWork) -> int:
    """Bytes of one encoded linear kind as gathered: packed codes, fp32 scale and whitening."""
    a, b = whitening_factors(lin.inp)
    words = words_per_row(lin.inp, lin.cfg, version=1)  # the plain bitstream of the work dir
    return lin.count * (4 * lin.out * words + 4 * lin.out + 8 * lin.inp + 4 * (a * a + b * b))


def comm_bytes(
    work: Sequence[LinearWork], arch: Architecture, settings: QuantizeSettings, world: int
) -> float:
    """Bytes through rank 0's link per block (the busiest): the Gram tree nodes of the other
    ranks (at most 1 + log2 of their batches each, fp64; with compensate the cross sums too)
    for the inputs it owns, a 1/W share, the encoded linears it receives and sends, the two
    streams it gathers (targets, next inputs) and the trained latents and scales (fp32)."""
    if world <= 1:
        return 0.0
    calib, corr = settings.calibration, settings.correction
    part = (world - 1) / world
    windows = -(-calib.nsamples // world)
    nodes = 1 + math.ceil(math.log2(max(1, -(-windows // corr.batch))))
    grams = sum(8 * n * (n + 1) * count for n, count, _ in distinct_inputs(work).values())
    if settings.compensate:  # the cross sums travel beside the Grams
        grams += sum(8 * x.count * x.out * x.inp for x in work if x.share == 1.0)
    gram = (world - 1) * nodes * grams / world
    states = sum(state_bytes(lin) for lin in work)
    stream = calib.nsamples * calib.seqlen * arch.hidden_size * 4
    latents = sum(
        lin.count * 4 * (lin.out * -(-lin.inp // lin.cfg.d) * lin.cfg.D + lin.out + 2 * lin.inp)
        for lin in work
    )
    return gram + states + 2 * part * stream + (world - 1) * latents


def assign(costs: Mapping[Any, float], world: int) -> dict[Any, int]:
    """Owner rank of each item (the block stage's split of its linears): largest cost first
    to the least-loaded rank, ties to the lower rank and equal costs in key order."""
    load = [0.0] * world
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return owner


@dataclass(frozen=True)
class StageCost:
    """One stage of an average block: units x coefficient = seconds."""

    stage: str
    units: float
    coefficient: float

    @property
    def seconds(self) -> float:
        return self.units * self.coefficient


@dataclass(frozen=True)
class BlockEstimate:
    """Estimated seconds of the block stage, per stage of an average block and in total."""

    coefficients: Coefficients
    world: int
    layers: int
    stages: tuple[StageCost, ...]

    @property
    def seconds_per_block(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_block * self.layers

    @property
    def is_estimate(self) -> bool:
        return not self.coefficients.measured_here

    def how(self) -> str:
        """The arithmetic, one line per stage: units x coefficient = seconds."""
        notes = {"comm": "at the link bandwidth", "correct": "not split over ranks"}
        if self.world > 1:
            notes |= {s: "fullest rank" for s in ("whiten", "encode", "ldlq")}
            notes |= {"stats": f"windows / {self.world}", "forward": f"windows / {self.world}"}
        lines = []
        for stage in self.stages:
            note = f"  ({notes[stage.stage]})" if stage.stage in notes else ""
            lines.append(
                f"{stage.stage:<8}{stage.units:10.3e} {UNITS[stage.stage]:<11} x "
                f"{stage.coefficient:.2e} s = {stage.seconds:9.2f} s{note}"
            )
        lines.append(
            f"block   {self.seconds_per_block:.2f} s x {self.layers} blocks = "
            f"{self.total_seconds:.0f} s  [{self.coefficients.source}]"
        )
        return "\n".join(lines)


def estimate(
    arch: Architecture,
    settings: QuantizeSettings,
    cfg: LatticeConfig,
    device_kind: str,
    world: int = 1,
    coefficients: Coefficients | None = None,
    config_for: Callable[[int, str], LatticeConfig] | None = None,
    beam: Callable[[LatticeConfig], int] | None = None,
    tf32: bool = True,
) -> BlockEstimate:
    """Seconds of the block stage of `arch` on `world` processes of `device_kind`.

    config_for(layer, kind): per-linear configs (default: every linear at `cfg`); beam: a
    config's search beam (default: its catalog entry's); tf32: GPU matmuls in TF32 (--tf32);
    coefficients: e.g. `fit` to measured stage times (default: `coefficients_for`). Stage
    units are averaged over the blocks; total = seconds per block x layers.
    """
    coef = coefficients or coefficients_for(device_kind, tf32)
    pick = config_for or (lambda _layer, _kind: cfg)
    totals = dict.fromkeys(STAGES, 0.0)
    for layer in range(arch.num_layers):
        work = block_work(arch, layer, pick, beam or _catalog_beam)
        per_linear = [linear_stage_units(lin, settings) for lin in work]
        costs = [sum(u[s] * coef.seconds[s] for s in u) for u in per_linear]
        owner = assign(dict(enumerate(costs)), world)
        bins = [[i for i in owner if owner[i] == rank] for rank in range(world)]
        fullest = max(bins, key=lambda ids: sum(costs[i] for i in ids))
        for index in fullest:
            for stage, units in per_linear[index].items():
                totals[stage] += units
        for stage, units in shared_stage_units(work, arch, settings, world).items():
            totals[stage] += units
        totals["comm"] += comm_bytes(work, arch, settings, world)
    stages = tuple(
        StageCost(s, totals[s] / arch.num_layers, coef.seconds[s])
        for s in STAGES
        if s != "comm" or world > 1
    )
    return BlockEstimate(coef, world, arch.num_layers, stages)


@dataclass(frozen=True)
class Sample:
    """A measured interval: the units of work of each stage it covered, and its seconds."""

    units: Mapping[str, float]
    seconds: float


def fit(samples: Sequence[Sample], base: Coefficients, ridge: float = 1e-6) -> Coefficients:
    """Least-squares coefficients from measured samples: seconds_i ~ sum_s c_s units_is.

    Solved for the ratios r_s = c_s / base_s, each sample weighted by 1 / seconds (relative
    error). A small penalty on the spread of the ratios decides what no sample separates
    (stats and forward, always timed together in block reports): of the fits the samples
    cannot tell apart, the one closest to a uniform speed-up over `base` (alone in their
    samples, two such stages keep base's proportion). Stages without samples keep base.
    """
    import torch  # a 7 x 7 solve; fitting follows a run, so torch is loaded anyway

    stages = [s for s in STAGES if any(x.units.get(s) for x in samples)]
    if not stages:
        return base
    c0 = torch.tensor([base.seconds[s] for s in stages], dtype=torch.float64)
    units = torch.tensor(
        [[x.units.get(s, 0.0) for s in stages] for x in samples], dtype=torch.float64
    )
    seconds = torch.tensor([x.seconds for x in samples], dtype=torch.float64)
    design = units * c0 / seconds[:, None]  # predicts 1 for every sample
    normal = design.T @ design
    k = len(stages)
    spread = torch.eye(k, dtype=torch.float64) - 1.0 / k  # (r - mean r)^2 as a quadratic form
    normal += ridge * normal.diagonal().max() * spread
    ratios = torch.linalg.solve(normal, design.sum(0)).clamp_min(1e-3)
    fitted = dict(base.seconds) | {
        s: float(r * c) for s, r, c in zip(stages, ratios, c0, strict=True)
    }
    return Coefficients(base.kind, fitted, f"fitted to {len(samples)} measured samples", True)


def report_samples(
    work: Sequence[LinearWork],
    arch: Architecture,
    settings: QuantizeSettings,
    reports: Sequence[Mapping[str, float]],
) -> list[Sample]:
    """Samples from block reports (quant/events.BlockReport as dicts) of blocks shaped `work`
    on one process: whiten; encode (LDLQ included); correct; the rest of `seconds` is the
    statistics (Grams and their forward passes)."""
    linear = [linear_stage_units(lin, settings) for lin in work]
    units = {s: sum(u[s] for u in linear) for s in ("whiten", "encode", "ldlq")}
    shared = shared_stage_units(work, arch, settings)
    calib = settings.calibration
    one_pass = forward_flops(work, arch, calib.nsamples * calib.seqlen, calib.seqlen)
    one_pass *= stats_passes(work, settings)
    out = []
    for r in reports:
        rest = r["seconds"] - r["seconds_whiten"] - r["seconds_encode"] - r["seconds_correct"]
        out.append(Sample({"whiten": units["whiten"]}, r["seconds_whiten"]))
        out.append(Sample({"encode": units["encode"], "ldlq": units["ldlq"]}, r["seconds_encode"]))
        out.append(Sample({"correct": shared["correct"]}, r["seconds_correct"]))
        if rest > 0:
            out.append(Sample({"stats": shared["stats"], "forward": one_pass}, rest))
    return out
