"""Measure this CPU's cost coefficients (quant/costmodel.py): tiny versions of every stage
of the block stage, timed, then fitted to their units of work. `preflight` and the
coefficients file use the result; nothing here runs unless asked for.

    python -c 'from liftq_cli.quant.cost_probe import measure_cpu_coefficients as m; print(m())'
"""

from __future__ import annotations

import time
from collections.abc import Callable

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import Architecture
from liftq_cli.quant.costmodel import (
    Coefficients,
    LinearWork,
    Sample,
    coefficients_for,
    fit,
    linear_stage_units,
    shared_stage_units,
)
from liftq_cli.quantize_job import QuantizeSettings


def measure_cpu_coefficients(seed: int = 0) -> Coefficients:
    """Seconds per unit of every stage on this CPU, from tiny versions of each (a few seconds).

    A fp64 Gram of [2048, 512] inputs (stats), a [2048, 512] x [512, 1024] matmul (forward),
    fit_whitening with 10 steps of a [256, 512] linear, the LQ-24/10 search of 128 x 52
    slices (encode), quantize_linear with LDLQ and a do-nothing search (its factorisations
    and error feedback), and correct_block with 10 steps on a gated MLP of 3 linears (h 128,
    inter 256) over 8 windows of 64 tokens. Each counts its fastest of 3 runs after a warm-up.
    """
    import torch
    from torch import nn

    from liftq_cli.quant.block_correction import CorrectableLinear, correct_block
    from liftq_cli.quant.encode import quantize_linear
    from liftq_cli.quant.lattice_catalog import catalog_encode, catalog_search, load_catalog_matrix
    from liftq_cli.quant.whitening import fit_whitening, init_whitening
    from liftq_cli.quantize_job import CalibrationSettings, CorrectionConfig

    def timed(fn: Callable[[], object]) -> float:
        fn()  # warm-up: first-call allocations and caches are not the steady state
        runs = []
        for _ in range(3):  # the fastest of three: other processes only ever add time
            began = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - began)
        return min(runs)

    def no_search(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*v.shape[:-1], m.shape[1], dtype=torch.bool)

    torch.manual_seed(seed)
    cfg = LatticeConfig(24, 10)
    matrix, beam = load_catalog_matrix(cfg), catalog_search(cfg).beam
    tokens, n, o = 2048, 512, 256
    x, wide, weight = torch.randn(tokens, n), torch.randn(1024, n), torch.randn(o, n) / n**0.5
    gram, act = x.T @ x / tokens, x.abs().mean(0)
    wh = init_whitening(n, act, 0.0, seed)
    slices = torch.randn(128 * -(-n // cfg.d), 1, cfg.d)
    settings = QuantizeSettings(whiten_steps=10)
    units = linear_stage_units(LinearWork("probe", o, n, cfg, beam), settings)
    encode_units = linear_stage_units(LinearWork("probe", 128, n, cfg, beam), settings)["encode"]
    samples = [
        Sample({"stats": 2 * tokens * n * n}, timed(lambda: x.double().T @ x.double())),
        Sample({"forward": 2 * tokens * n * 1024}, timed(lambda: x @ wide.T)),
        Sample(
            {"whiten": units["whiten"]},
            timed(lambda: fit_whitening(weight, gram, act, cfg.bits, steps=10, alphas=(0.0,))),
        ),
        Sample({"encode": encode_units}, timed(lambda: catalog_encode(slices, matrix))),
        Sample(
            {"ldlq": units["ldlq"]},
            timed(lambda: quantize_linear(weight, wh, cfg, matrix, no_search, gram=gram)),
        ),
    ]
    h, inter, windows, seqlen = 128, 256, 8, 64
    shapes = [("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)]

    def correctable(out: int, inp: int) -> CorrectableLinear:
        start = init_whitening(inp, torch.ones(inp), 0.0, seed)
        quant = quantize_linear(torch.randn(out, inp) / inp**0.5, start, cfg, matrix, no_search)
        return CorrectableLinear(quant, None, 0.05)

    gate, up, down = (correctable(out, inp) for _, out, inp in shapes)

    def mlp(_block: nn.Module, v: torch.Tensor) -> torch.Tensor:
        return down(nn.functional.silu(gate(v)) * up(v))

    block = nn.ModuleList([gate, up, down])
    inputs, targets = torch.randn(windows, seqlen, h), torch.randn(windows, seqlen, h)
    correction = CorrectionConfig(steps=10, batch=2)
    seconds = timed(lambda: correct_block(block, inputs, targets, mlp, correction))
    probe = Architecture("probe", h, inter, 1, 1, 1, 0, 1, True)  # head_dim 0: no attention
    calib = CalibrationSettings(nsamples=windows, seqlen=seqlen)
    work = [LinearWork(kind, out, inp, cfg, beam) for kind, out, inp in shapes]
    shared = shared_stage_units(work, probe, QuantizeSettings(calib, correction=correction))
    samples.append(Sample({"correct": shared["correct"]}, seconds))
    fitted = fit(samples, coefficients_for("cpu"))
    source = f"measured here ({torch.get_num_threads()} threads)"
    return Coefficients("cpu", fitted.seconds, source, measured_here=True)
