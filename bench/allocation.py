"""How well `quantize --mixed`'s sensitivity predicts each linear's real error, and what a
better prediction could buy.

`quantize --mixed` (quant/sensitivity.py) prices a linear at config c as kappa * mse_c / 2,
kappa = sum_t (sum_i g_ti^2 rms_i^2) ||x_t||^2: it assumes the encoder leaves isotropic noise
on every weight. LDLQ and the whitening shape that noise away from the input's strong
directions, so this bench measures, per linear of a real `liftq quantize` output (uniform
config), on the last windows of `wiki` (past its evaluation prefix):

* actual: sum_t sum_i g_ti^2 (e_i . x_t)^2 with e_i the row error of the real codes, the same
  second-order (empirical-Fisher) loss increase with the error the encoder really left;
* iso: kappa x the linear's relative weight MSE (what the allocator's model predicts);
* shaped: kappa with ||x_t||^2 replaced by ||A x_t||^2, A = diag(L) L^-1 from the Cholesky
  factor L of the input Gram after a random rotation (the error LDLQ leaves is white in
  that basis), times the relative weight MSE.

It then allocates the same average bits three ways (iso, shaped, and the oracle that knows
`actual`) with the product's allocator and prices each allocation with the oracle model
(actual x catalog MSE of the config / MSE of the uniform config): how much of the loss
increase a perfect sensitivity would remove.

    python bench/allocation.py --quantized bench/work/quality/liftq-2.4 \\
        --mixed bench/work/quality/liftq-2.4-mixed

writes bench/results/allocation.{json,md}. About 3 minutes on 2 cores for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.environment import versions  # noqa: E402

from liftq_cli.data.calibration import tokenize  # noqa: E402
from liftq_cli.data.text import load_text  # noqa: E402
from liftq_cli.io.checkpoints import load_model, load_tokenizer, materialize, resolve  # noqa: E402
from liftq_cli.io.quantized import read_quantized  # noqa: E402
from liftq_cli.lattice_config import LatticeConfig  # noqa: E402
from liftq_cli.plan.allocation import allocate  # noqa: E402
from liftq_cli.quant.lattice_catalog import catalog_mse  # noqa: E402
from liftq_cli.quant.sensitivity import decoder_linears  # noqa: E402
from liftq_cli.runtime.quantized import dequantized_state  # noqa: E402

Key = tuple[int, str]


def windows(model: str, count: int, seqlen: int) -> torch.Tensor:
    """The last count x seqlen tokens of `wiki`, far past its evaluation prefix."""
    tokenizer = load_tokenizer(materialize(resolve(model)))
    ids = tokenize(tokenizer, load_text("wiki").text)
    if ids.numel() < 200_000 + count * seqlen:
        raise SystemExit(f"`wiki` has {ids.numel()} tokens: too few for {count} windows")
    return ids[-count * seqlen :].view(count, seqlen)


def input_grams(model: torch.nn.Module, ids: torch.Tensor) -> dict[Key, torch.Tensor]:
    """sum_t x_t x_t^T of every decoder linear's input (float64)."""
    grams: dict[Key, torch.Tensor] = {}
    handles = []
    for key, module in decoder_linears(model).items():

        def hook(_m, args, _out, key=key):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            grams[key] = grams.get(key, 0) + x.T @ x

        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, ids.shape[0], 2):
            model(input_ids=ids[start : start + 2])
    for handle in handles:
        handle.remove()
    return grams


def shaping(grams: dict[Key, torch.Tensor], seed: int) -> dict[Key, torch.Tensor]:
    """A = diag(L) L^-1 Q^T per linear: ||A x||^2 is x's energy in the directions LDLQ cannot
    cancel (Q a random rotation, L the Cholesky factor of Q^T H Q + 1% mean-diagonal damping)."""
    gen = torch.Generator().manual_seed(seed)
    rotations: dict[int, torch.Tensor] = {}
    shaped = {}
    for key, gram in grams.items():
        n = gram.shape[0]
        if n not in rotations:
            rotations[n] = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
        q = rotations[n]
        h = q.T @ gram @ q
        h = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
        chol = torch.linalg.cholesky(h)
        shaped[key] = torch.diag(chol.diagonal()) @ torch.linalg.inv(chol) @ q.T
    return shaped


def measure(model, ids, errors, shaped) -> dict[Key, dict[str, float]]:
    """Per linear: kappa (the allocator's), kappa_shaped and actual (see the module doc)."""
    linears = decoder_linears(model)
    row_power = {k: m.weight.detach().double().pow(2).mean(1) for k, m in linears.items()}
    sums = {k: {"kappa": 0.0, "kappa_shaped": 0.0, "actual": 0.0} for k in linears}
    inputs: dict[Key, torch.Tensor] = {}
    handles = []
    for key, module in linears.items():

        def forward(_m, args, _out, key=key):
            inputs[key] = args[0].detach().double()

        def backward(_m, _gin, gout, key=key):
            g2 = gout[0].detach().double().pow(2)
            x = inputs.pop(key)
            weight = g2 @ row_power[key]
            sums[key]["kappa"] += float((weight * x.pow(2).sum(-1)).sum())
            sums[key]["kappa_shaped"] += float((weight * (x @ shaped[key].T).pow(2).sum(-1)).sum())
            sums[key]["actual"] += float((g2 * (x @ errors[key].T).pow(2)).sum())

        handles += [
            module.register_forward_hook(forward),
            module.register_full_backward_hook(backward),
        ]
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    for start in range(0, ids.shape[0], 2):
        batch = ids[start : start + 2]
        model(input_ids=batch, labels=batch).loss.backward()
    for handle in handles:
        handle.remove()
    return sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quantized", type=Path, required=True, help="a uniform quantize output")
    parser.add_argument("--mixed", type=Path, help="a `quantize --mixed` output to report on")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--gram-windows", type=int, default=16)
    parser.add_argument("--windows", type=int, default=8, help="forward+backward windows")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=float, nargs="+", default=[2.4, 3.0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.perf_counter()
    quantized = read_quantized(args.quantized)
    uniform = sorted(set(quantized.layers.values()))
    if len(uniform) != 1:
        raise SystemExit(f"{args.quantized} mixes configs: pass a uniform quantize output")
    model = load_model(args.model).model.eval()
    linears = decoder_linears(model)
    state = dequantized_state(args.quantized)
    errors, rel_mse = {}, {}
    for (layer, kind), module in linears.items():
        name = next(n for n in quantized.layers if n.endswith(f"layers.{layer}.{_module(kind)}"))
        w = module.weight.detach().double()
        errors[(layer, kind)] = state[f"{name}.weight"].double() - w
        rel_mse[(layer, kind)] = float(
            (errors[(layer, kind)].pow(2).mean(1) / w.pow(2).mean(1)).mean()
        )
    shapes = {key: tuple(module.weight.shape) for key, module in linears.items()}
    ids = windows(args.model, args.gram_windows + args.windows, args.seqlen)
    shaped = shaping(input_grams(model, ids[: args.gram_windows]), seed=0)
    sums = measure(model, ids[args.gram_windows :], errors, shaped)
    rows = []
    for key in linears:
        s = sums[key]
        rows.append({
            "layer": key[0], "kind": key[1], "rel_mse": rel_mse[key], "actual": s["actual"],
            "iso": s["kappa"] * rel_mse[key], "shaped": s["kappa_shaped"] * rel_mse[key],
            "kappa": s["kappa"], "kappa_shaped": s["kappa_shaped"],
        })  # fmt: skip
    report = {
        "model": args.model,
        "quantized": str(args.quantized),
        "config": uniform[0].name,
        "windows": {"gram": args.gram_windows, "fisher": args.windows, "seqlen": args.seqlen},
        "linears": rows,
        "fit": fit(rows),
        "allocations": allocations(rows, shapes, uniform[0], args.bits),
        "mixed": mixed_bits(args.mixed) if args.mixed else None,
        "mixed_from": str(args.mixed) if args.mixed else None,
        "seconds": round(time.perf_counter() - began, 1),
        "versions": versions(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "allocation.json").write_text(json.dumps(report, indent=1))
    (args.results / "allocation.md").write_text(render(report))
    print((args.results / "allocation.md").read_text())


def _module(kind: str) -> str:
    return f"{'mlp' if kind in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{kind}"


def fit(rows: list[dict]) -> dict:
    """How far each prediction is from `actual`: the spread of log(actual / prediction) over
    the linears (a constant factor does not matter to the allocator, the spread does), each
    kind's share of the total, and the worst linears."""
    out: dict = {"log_sd": {}, "share": defaultdict(dict), "worst": {}}
    for model in ("iso", "shaped"):
        logs = [math.log(r["actual"] / r[model]) for r in rows]
        out["log_sd"][model] = statistics.pstdev(logs)
        worst = sorted(rows, key=lambda r: r[model] / r["actual"], reverse=True)[:5]
        out["worst"][model] = [
            {"linear": f"{r['layer']}.{r['kind']}", "over": r[model] / r["actual"]} for r in worst
        ]
    for model in ("actual", "iso", "shaped"):
        total = sum(r[model] for r in rows)
        for r in rows:
            out["share"][r["kind"]][model] = (
                out["share"][r["kind"]].get(model, 0.0) + r[model] / total
            )
    out["share"] = dict(out["share"])
    return out


def allocations(
    rows: list[dict], shapes: dict[Key, tuple[int, int]], uniform: LatticeConfig, bits: list[float]
) -> list[dict]:
    """The product's allocator fed each sensitivity, every result priced by the oracle."""
    mse = catalog_mse()
    actual = {(r["layer"], r["kind"]): r["actual"] for r in rows}
    feeds = {
        "iso (quantize --mixed)": {(r["layer"], r["kind"]): r["kappa"] for r in rows},
        "shaped": {(r["layer"], r["kind"]): r["kappa_shaped"] for r in rows},
        "oracle": {(r["layer"], r["kind"]): r["actual"] / r["rel_mse"] for r in rows},
    }
    base = sum(actual.values())
    out = []
    for target in bits:
        for name, kappa in feeds.items():
            result = allocate(shapes, kappa, mse, target, uniform)
            priced = sum(actual[k] * mse[c] / mse[uniform] for k, c in result.configs.items())
            by_kind = defaultdict(list)
            for (_, kind), cfg in result.configs.items():
                by_kind[kind].append(cfg.bits)
            out.append({
                "bits": target, "sensitivity": name, "code_bits": result.code_bits,
                "oracle_loss": priced / base,
                "bits_by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
            })  # fmt: skip
    return out


def mixed_bits(folder: Path) -> dict[str, float]:
    """Average bits per kind of a `quantize --mixed` output."""
    by_kind = defaultdict(list)
    for name, cfg in read_quantized(folder).layers.items():
        by_kind[name.rpartition(".")[2]].append(cfg.bits)
    return {k: sum(v) / len(v) for k, v in by_kind.items()}


KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def render(report: dict) -> str:
    fit_, w = report["fit"], report["windows"]
    lines = [
        f"# Sensitivity of `quantize --mixed` against the real error: {report['model']}",
        "",
        f"Command: `python bench/allocation.py --quantized {report['quantized']}"
        + (f" --mixed {report['mixed_from']}" if report["mixed"] else "")
        + "`. "
        f"Errors of the real {report['config']} codes of that output; input Grams over "
        f"{w['gram']} and gradients over {w['fisher']} further windows of {w['seqlen']} tokens "
        "from the end of `wiki` (not the evaluation prefix). "
        f"Run took {report['seconds']:.0f} s.",
        "",
        "Share of the second-order loss increase by kind, as measured with the real error "
        "(`actual`) and as each model predicts it:",
        "",
        "| kind | actual | iso (quantize --mixed) | shaped |"
        + (" bits given by --mixed |" if report["mixed"] else ""),
        "|---|---:|---:|---:|" + ("---:|" if report["mixed"] else ""),
    ]
    for kind in KINDS:
        share = fit_["share"].get(kind)
        if share is None:
            continue
        row = f"| {kind} | {share['actual']:.3f} | {share['iso']:.3f} | {share['shaped']:.3f} |"
        if report["mixed"]:
            row += f" {report['mixed'].get(kind, float('nan')):.2f} |"
        lines.append(row)
    lines += [
        "",
        "Spread of log(actual / predicted) over the linears (0 would be a perfect ranking): "
        + ", ".join(f"{k} {v:.2f}" for k, v in fit_["log_sd"].items())
        + ".",
        "",
        "Most over-priced linears (predicted / actual):",
        "",
    ]
    for model, worst in fit_["worst"].items():
        lines.append(f"- {model}: " + ", ".join(f"{x['linear']} {x['over']:.1f}x" for x in worst))
    lines += [
        "",
        "The product's allocator fed each sensitivity, priced by the oracle (actual x catalog "
        "MSE of the chosen config / MSE of the uniform config; 1.000 = uniform "
        f"{report['config']}, lower is better):",
        "",
        "| bits | sensitivity | code bits | oracle loss vs uniform | " + " | ".join(KINDS) + " |",
        "|---:|---|---:|---:|" + "---:|" * len(KINDS),
    ]
    for a in report["allocations"]:
        lines.append(
            f"| {a['bits']} | {a['sensitivity']} | {a['code_bits']:.3f} | {a['oracle_loss']:.3f} | "
            + " | ".join(f"{a['bits_by_kind'].get(k, float('nan')):.2f}" for k in KINDS)
            + " |"
        )
    versions_ = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += ["", f"versions: {versions_}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
