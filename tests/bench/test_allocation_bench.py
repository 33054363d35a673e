"""bench/allocation.py's pure parts: the LDLQ shaping, the fit of a prediction, the priced
allocations and the report. Synthetic: no model."""

from __future__ import annotations

import math

import pytest
import torch
from bench.allocation import allocations, fit, render, shaping

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.lattice_catalog import catalog_mse


def test_shaping_keeps_the_energy_ldlq_cannot_cancel():
    n, gen = 16, torch.Generator().manual_seed(1)
    white = torch.randn(4096, n, generator=gen, dtype=torch.float64)
    strong = white.clone()
    strong[:, 0] *= 30  # one dominant input direction, fully predictable from itself
    strong[:, 1] = strong[:, 0] + 0.1 * white[:, 1]  # a channel that mostly copies it
    # the first pivot still pays its 1/n share of the dominant energy: about 0.1 here
    for x, low, high in ((white, 0.9, 1.0), (strong, 0.0, 0.15)):
        gram = x.T @ x
        a = shaping({(0, "q_proj"): gram}, seed=0)[(0, "q_proj")]
        ratio = float((x @ a.T).pow(2).sum() / x.pow(2).sum())
        assert low < ratio <= high, ratio
        # what is left is white: A H A^T is diagonal (the LDL pivots, damping aside)
        off = a @ gram @ a.T
        off.diagonal().zero_()
        assert float(off.abs().max()) < 0.05 * float((a @ gram @ a.T).diagonal().max())


def rows(scale: dict[str, float]) -> list[dict]:
    out = []
    for layer in range(3):
        for kind, factor in scale.items():
            kappa = 10.0 * (layer + 1)
            out.append({
                "layer": layer, "kind": kind, "rel_mse": 0.1, "kappa": kappa,
                "kappa_shaped": kappa * factor, "iso": kappa * 0.1,
                "shaped": kappa * factor * 0.1, "actual": kappa * factor * 0.1 * 0.5,
            })  # fmt: skip
    return out


def test_fit_scores_a_prediction_by_its_spread_not_its_scale():
    got = fit(rows({"q_proj": 1.0, "down_proj": 0.01}))
    assert got["log_sd"]["shaped"] == pytest.approx(0.0, abs=1e-12)  # actual = shaped / 2
    assert got["log_sd"]["iso"] == pytest.approx(math.log(100) / 2)
    assert got["share"]["down_proj"]["iso"] == pytest.approx(0.5)
    assert got["share"]["down_proj"]["actual"] == pytest.approx(0.01 / 1.01)
    assert got["worst"]["iso"][0]["linear"].endswith("down_proj")


def test_the_oracle_allocation_is_never_priced_above_the_others():
    table = rows({"q_proj": 1.0, "down_proj": 0.01})
    shapes = {(r["layer"], r["kind"]): (64, 64) for r in table}
    uniform = LatticeConfig.parse("LQ-24/10")
    assert uniform in catalog_mse()
    result = allocations(table, shapes, uniform, [2.4])
    priced = {a["sensitivity"]: a for a in result}
    assert set(priced) == {"iso (quantize --mixed)", "shaped", "oracle"}
    assert all(a["code_bits"] <= 2.4 + 1e-9 for a in result)
    oracle = priced["oracle"]["oracle_loss"]
    assert oracle <= min(a["oracle_loss"] for a in result) + 1e-12
    assert priced["shaped"]["oracle_loss"] == pytest.approx(oracle)  # it ranks like actual
    assert priced["iso (quantize --mixed)"]["oracle_loss"] > oracle  # it does not
    # the oracle spends on q_proj, whose real error costs 100x more per unit of MSE
    assert (
        priced["oracle"]["bits_by_kind"]["q_proj"] > priced["oracle"]["bits_by_kind"]["down_proj"]
    )
    report = {
        "model": "m", "quantized": "q", "config": uniform.name, "mixed": {"q_proj": 2.5},
        "mixed_from": "mq", "windows": {"gram": 1, "fisher": 1, "seqlen": 8}, "fit": fit(table),
        "allocations": result, "seconds": 1.0, "versions": {"torch": "x"},
    }  # fmt: skip
    text = render(report)
    assert (
        "--mixed mq`" in text
        and "| q_proj |" in text
        and "| 2.4 | oracle |" in text
        and "2.50" in text
    )
