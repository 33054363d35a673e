"""Lattice encoder benchmark: quality and speed of every catalog config.

One row per config: bits; the catalog matrix's Gaussian MSE with the encoder it ships with
(the default search at the manifest's `search_beam`) on the
100k held-out slices (measured here); the paper's MSE where published; the rate-distortion
bound 2^(-2 bits); seconds per million weights of our K-best encoder (timed on those 100k
slices) and of the published pad search on the same matrix, on the first slices of the same
sample, in the same run; the speed ratio; and both encoders' MSE on the pad search's slices.
The pad search costs 2^(D-d) candidates per slice, so it runs on a prefix sized to a fixed
amount of work (`--pad-work` flops, at most 2000 slices) and its time is per weight.
A second table sweeps the encoder's beam on LQ-24/10 (the speed/MSE trade-off).
Writes bench/results/lattice.md and bench/results/lattice.json.

Usage: nice -n 10 python bench/lattice.py [--pad-work 6e10] [--configs LQ-24/10,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/lattice.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch
from bench.environment import versions, versions_line

from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig
from liftq_cli.quant.lattice import (
    DEFAULT_SEARCH,
    encode,
    gaussian_mse,
    pad_search_encode,
    rate_distortion_bound,
)
from liftq_cli.quant.lattice_catalog import catalog_manifest, catalog_search, load_catalog_matrix
from liftq_cli.quant.lattice_train import EVAL_SAMPLES, held_out_sample

RESULTS = Path(__file__).parent / "results"
PAPER_MSE = {"LQ-16/8": 0.089, "LQ-32/16": 0.082, "LQ-30/14": 0.070, "LQ-24/10": 0.053}
PAPER_MSE["LQ-32/20"] = 0.146
# Published pad-search timings (2 CPU cores, the paper's matrices), s per million weights.
PAPER_PAD_SECONDS = {"LQ-24/10": 400.0, "LQ-24/8": 2200.0}
PAD_MAX_SLICES = 2000
SWEEP_BEAMS = (8, 16, 32, 64, 128)
FOOTNOTE = "At 2 bits, other codebooks for reference: E8P 0.089, QTIP 0.073, INT2 0.119."


def pad_slices(cfg: LatticeConfig, work: float) -> int:
    """Slices for the pad search so that its candidate work stays near `work` flops."""
    per_slice = 2 ** (cfg.D - cfg.d) * cfg.D * (cfg.d + 1) * 2
    return int(max(8, min(PAD_MAX_SLICES, work // per_slice)))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def bench_config(cfg: LatticeConfig, work: float, manifest_mse: float) -> dict:
    M, search = load_catalog_matrix(cfg), catalog_search(cfg)
    x = held_out_sample(cfg.d, EVAL_SAMPLES)
    encode(x[:256], M, search)  # warm-up (the search plan is cached per matrix)
    ours, ours_s = timed(encode, x, M, search)
    n_pad = pad_slices(cfg, work)
    sub = x[:n_pad]
    pad, pad_s = timed(pad_search_encode, sub, M)
    ours_sub, ours_sub_s = timed(encode, sub, M, search)
    per_mw = 1e6 / cfg.d
    pad_mse, ours_on_pad = gaussian_mse(sub, M, pad), gaussian_mse(sub, M, ours[:n_pad])
    return {
        "config": cfg.name,
        "D": cfg.D,
        "d": cfg.d,
        "bits": round(cfg.bits, 4),
        "beam": search.beam,
        "mse": gaussian_mse(x, M, ours),
        "manifest_mse": manifest_mse,
        "paper_mse": PAPER_MSE.get(cfg.name),
        "rd_bound": rate_distortion_bound(cfg.bits),
        "ours_s_per_mw": ours_s / len(x) * per_mw,
        "pad_s_per_mw": pad_s / n_pad * per_mw,
        "speedup": (pad_s / n_pad) / (ours_s / len(x)),
        "pad_slices": n_pad,
        "ours_s_per_mw_on_pad_slices": ours_sub_s / n_pad * per_mw,
        "pad_mse_on_pad_slices": pad_mse,
        "ours_mse_on_pad_slices": ours_on_pad,
        "ours_vs_pad_mse": ours_on_pad / pad_mse,
        "same_codes_on_pad_slices": torch.equal(ours_sub, ours[:n_pad]),
        "paper_pad_s_per_mw": PAPER_PAD_SECONDS.get(cfg.name),
    }


def beam_sweep(cfg: LatticeConfig, n: int, n_pad: int) -> list[dict]:
    """Our encoder at several beams on the same slices: MSE vs a beam-512 search, vs pad."""
    M = load_catalog_matrix(cfg)
    x = held_out_sample(cfg.d, n)
    reference = gaussian_mse(x, M, encode(x, M, replace(DEFAULT_SEARCH, beam=512)))
    pad_mse = gaussian_mse(x[:n_pad], M, pad_search_encode(x[:n_pad], M))
    rows = []
    for beam in SWEEP_BEAMS:
        search = replace(DEFAULT_SEARCH, beam=beam)
        encode(x[:256], M, search)
        codes, seconds = timed(encode, x, M, search)
        rows.append(
            {
                "config": cfg.name,
                "beam": beam,
                "default": beam == DEFAULT_SEARCH.beam,
                "mse": gaussian_mse(x, M, codes),
                "mse_vs_beam512": gaussian_mse(x, M, codes) / reference,
                "mse_vs_pad_on_pad_slices": gaussian_mse(x[:n_pad], M, codes[:n_pad]) / pad_mse,
                "s_per_mw": seconds / x.numel() * 1e6,
            }
        )
    return rows


def markdown(rows: list[dict], sweep: list[dict], meta: dict) -> str:
    lines = [
        "# Lattice encoder: Gaussian MSE and speed",
        "",
        f"Command: `nice -n 10 python bench/lattice.py {meta['arguments']}`. "
        f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} torch threads; load "
        f"average {meta['load_start']} at start, {meta['load_end']} at the end (the machine "
        "is shared: wall-clock times are inflated by the other jobs, both encoders alike).",
        "",
        "MSE ours: the catalog matrix with the encoder it ships with (K-best beam as in the "
        f"beam column, ridge {meta['ridge']}, tail {meta['tail']}) on the {EVAL_SAMPLES:,} "
        "held-out N(0, I) "
        "slices (seed 1234), as in manifest.json. Ours s/Mw: wall clock for those slices. "
        "Pad s/Mw: the published pad search (2^(D-d) candidates per slice) on the same matrix, "
        "timed on the first `pad slices` of the same sample. Speed ratio = pad s/Mw / ours "
        "s/Mw. Last column: both encoders' MSE on the pad slices.",
        "",
        "| config | bits | beam | MSE ours | paper MSE | R-D bound | ours s/Mw | pad s/Mw "
        "| ratio | pad slices | MSE ours / pad |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        paper = f"{r['paper_mse']:.3f}" if r["paper_mse"] is not None else "-"
        lines.append(
            f"| {r['config']} | {r['bits']:.2f} | {r['beam']} | {r['mse']:.4f} | {paper} | "
            f"{r['rd_bound']:.4f} | {r['ours_s_per_mw']:.2f} | {r['pad_s_per_mw']:,.0f} | "
            f"{r['speedup']:,.0f}x | {r['pad_slices']} | {r['ours_vs_pad_mse']:.3f} |"
        )
    lines += [
        "",
        "s/Mw = seconds per million weights. Paper's pad-search timings on 2 CPU cores with "
        "its own matrices: LQ-24/10 400 s/Mw (MSE 0.0528), LQ-24/8 2,200 s/Mw (MSE 0.0252). "
        "JSON: ours timed on the pad slices alone, and whether it returns the same codes there.",
        "",
        FOOTNOTE,
        "",
        f"## Encoder beam on {sweep[0]['config']} ({meta['sweep_slices']:,} slices)",
        "",
        "| beam | MSE | vs beam 512 | vs pad search (first "
        f"{meta['sweep_pad_slices']} slices) | s/Mw |",
        "|---|---|---|---|---|",
    ]
    for r in sweep:
        mark = " (default)" if r["default"] else ""
        lines.append(
            f"| {r['beam']}{mark} | {r['mse']:.5f} | {r['mse_vs_beam512']:.4f} | "
            f"{r['mse_vs_pad_on_pad_slices']:.4f} | {r['s_per_mw']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pad-work", type=float, default=6e10, help="flops per pad search")
    parser.add_argument("--configs", default="", help="comma-separated (default: catalog)")
    parser.add_argument("--sweep-slices", type=int, default=20_000)
    args = parser.parse_args()
    configs = (
        [LatticeConfig.parse(c) for c in args.configs.split(",")]
        if args.configs
        else list(CATALOG_CONFIGS)
    )
    manifest = {e["name"]: e for e in catalog_manifest()["entries"]}
    meta = {
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": round(os.getloadavg()[0], 2),
        **{k: v for k, v in asdict(DEFAULT_SEARCH).items() if k in ("beam", "ridge", "tail")},
        "pad_work": args.pad_work,
        "torch": torch.__version__,
        "versions": versions(),
        "sweep_slices": args.sweep_slices,
        "arguments": f"--pad-work {args.pad_work:.0e} --sweep-slices {args.sweep_slices}"
        + (f" --configs {args.configs}" if args.configs else ""),
    }
    rows = []
    for cfg in configs:
        row = bench_config(cfg, args.pad_work, manifest[cfg.name]["gaussian_mse"])
        rows.append(row)
        print(
            f"{row['config']:>9}  mse {row['mse']:.4f}  ours {row['ours_s_per_mw']:.2f} s/Mw  "
            f"pad {row['pad_s_per_mw']:.1f} s/Mw ({row['pad_slices']} slices)  "
            f"x{row['speedup']:.0f}  mse ours/pad {row['ours_vs_pad_mse']:.3f}",
            flush=True,
        )
    sweep_cfg = LatticeConfig(24, 10)
    meta["sweep_pad_slices"] = pad_slices(sweep_cfg, args.pad_work)
    sweep = beam_sweep(sweep_cfg, args.sweep_slices, meta["sweep_pad_slices"])
    meta["load_end"] = round(os.getloadavg()[0], 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lattice.md").write_text(markdown(rows, sweep, meta) + "\n" + versions_line() + "\n")
    payload = {"meta": meta, "rows": rows, "beam_sweep": sweep}
    (RESULTS / "lattice.json").write_text(json.dumps(payload, indent=2) + "\n")
    print((RESULTS / "lattice.md").read_text())


if __name__ == "__main__":
    main()
