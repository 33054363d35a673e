"""The quantize half of bench/gpu_check.sh: two blocks of smollm2-135m on CUDA against the
CPU, stage by stage.

Quantizes the first --blocks blocks of smollm2-135m (bench/quantize_scaling.py's truncated
copy) with --device cpu, --device cuda (TF32 allowed) and --device cuda --no-tf32, the same
calibration and seed, and prints for each CUDA run: the share of code bits equal to the CPU
run's (per linear kind and overall), the block output MSE after correction beside the CPU's,
and the seconds of every stage per block. CUDA and CPU do not sum in the same order, so codes
may differ in the bits whose slices lie near a decision boundary; the block MSE says whether
that matters. Exit status 1 when the CUDA block MSE is more than 10% above the CPU's or fewer
than 90% of the bits agree.

Usage: python bench/gpu_check.py [--blocks 2] [--nsamples 32] [--seqlen 512] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench.environment import versions_line  # noqa: E402
from bench.quantize_scaling import quantize, truncated_model  # noqa: E402

from liftq_cli.io.quantized import read_quantized  # noqa: E402


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Share of equal code bits per linear kind, and "all"."""
    left, right = read_quantized(a).linear_states(), read_quantized(b).linear_states()
    equal, total = {}, {}
    for name, state in left.items():
        kind = name.rpartition(".")[2]
        same = (state["codes"] == right[name]["codes"]).sum().item()
        equal[kind] = equal.get(kind, 0) + same
        total[kind] = total.get(kind, 0) + state["codes"].numel()
    shares = {k: equal[k] / total[k] for k in sorted(total)}
    shares["all"] = sum(equal.values()) / sum(total.values())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run this on a GPU machine (bench/gpu_check.sh)")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(versions_line())
    results, ok = {}, True
    with tempfile.TemporaryDirectory(prefix="liftq-gpu-check-") as tmp:
        model = truncated_model(args.blocks, Path(tmp))
        runs = {
            "cpu": ["--device", "cpu"],
            "cuda": ["--device", "cuda"],
            "cuda --no-tf32": ["--device", "cuda", "--no-tf32"],
        }
        done = {}
        for name, extra in runs.items():
            out = Path(tmp) / name.replace(" ", "_")
            done[name] = quantize(model, out, 1, args, extra)
            done[name]["out"] = out
        for name in runs:
            run = done[name]
            row = {"wall": run["wall"], "blocks": run["blocks"]}
            if name != "cpu":
                row["agreement"] = agreement(done["cpu"]["out"], run["out"])
            results[name] = row
    cpu = results["cpu"]["blocks"]
    print("\nper block: output MSE after correction, seconds (whiten / encode / correct / all)")
    for name, row in results.items():
        for block, base in zip(row["blocks"], cpu, strict=True):
            ratio = block["mse_after"] / max(base["mse_after"], 1e-30)
            print(
                f"  {name:<15} block {block['layer']}: MSE {block['mse_after']:.4g} "
                f"({ratio:.3f} x CPU)  {block['seconds_whiten']:.2f} / "
                f"{block['seconds_encode']:.2f} / {block['seconds_correct']:.2f} / "
                f"{block['seconds']:.2f} s"
            )
            ok &= name == "cpu" or ratio <= 1.10
        if "agreement" in row:
            shares = ", ".join(f"{k} {v:.4f}" for k, v in row["agreement"].items())
            print(f"  {name:<15} code bits equal to the CPU run: {shares}")
            ok &= row["agreement"]["all"] >= 0.90
        print(f"  {name:<15} whole command {row['wall']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print("\nquantize check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
