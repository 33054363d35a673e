"""Check a packed model against the quantized folder it came from (issue: `liftq pack`).

Packs QUANT_DIR (unless --packed names an existing packed folder), then checks and prints:

1. every sign-code bit of every linear survives pack -> unpack;
2. the bytes of the quantized parts equal the closed formula, and `liftq plan`'s memory model
   for the same architecture and configs (embeddings and lm_head at fp16) predicts the size of
   model.safetensors within 0.5%;
3. effective bits per quantized weight = nominal D/d + the reported overhead;
4. perplexity of the packed model equals the unpacked (fake-quant) model's within 0.1%
   (same protocol as `liftq eval`: wikitext2, ctx 1024, first 40960 tokens by default).

The pack keeps the embedding and lm_head at fp16 (`--embed fp16 --lm-head fp16`), so the
perplexity compares the packed linears alone; tests/io/test_packed_embeddings.py covers the
other settings.

Usage: python bench/packed_check.py QUANT_DIR [--packed DIR] [--ctx 1024] [--max-tokens 40960]
       [--ppl wikitext2] [--skip-ppl] [--json PATH]
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from liftq_cli.evaluate.report import evaluate
from liftq_cli.io.codes import unpack_codes as read_codes
from liftq_cli.io.packed import pack_quantized, read_packed_config, unpack_codes
from liftq_cli.plan.architectures import from_hf_config
from liftq_cli.plan.memory import MemorySettings, model_breakdown

PLAN_TOLERANCE = 0.005
PPL_TOLERANCE = 0.001


def plan_name(spec_name: str) -> str:
    """layers.3.q_proj -> model.layers.3.self_attn.q_proj (plan names -> HF module names)."""
    _, layer, kind = spec_name.split(".")
    block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{block}.{kind}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("quant_dir", type=Path)
    parser.add_argument("--packed", type=Path, default=None)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=40960)
    parser.add_argument("--ppl", default="wikitext2")
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    packed = args.packed or args.quant_dir.with_name(f"{args.quant_dir.name}-packed")
    # fp16 embedding and lm_head: the perplexity check is about the packed linears
    report = pack_quantized(args.quant_dir, packed, embed="fp16", lm_head="fp16")
    checks: dict[str, bool] = {}
    out: dict[str, object] = {"quant_dir": str(args.quant_dir), "packed": str(packed)}

    unpacked = unpack_codes(packed)
    with safe_open(args.quant_dir / "liftq_codes.safetensors", framework="pt") as handle:
        same = [
            torch.equal(bits, read_codes(handle.get_tensor(f"{k}.codes"), *bits.shape[1:]))
            for k, bits in unpacked.items()
        ]
    checks["codes_bit_for_bit"] = all(same) and len(same) > 0
    print(f"codes: {sum(same)}/{len(same)} linears identical bit for bit after pack -> unpack")

    quantized = sum(report.parts[k] for k in report.formula)
    formula = sum(report.formula.values())
    checks["parts_equal_formula"] = all(report.parts[k] == v for k, v in report.formula.items())
    config = json.loads((args.quant_dir / "config.json").read_text())
    arch = from_hf_config(config, args.quant_dir.name, str(args.quant_dir))
    layers = read_packed_config(packed)
    breakdown = model_breakdown(
        arch,
        lambda spec: layers[plan_name(spec.name)],
        MemorySettings(embed="fp16", lm_head="fp16"),
    )
    planned = breakdown.weights + sum(
        breakdown.parts[k] for k in ("embed", "lm_head", "norms_biases")
    )
    file_bytes = (packed / "model.safetensors").stat().st_size
    plan_dev = planned / file_bytes - 1
    checks["plan_within_0.5%"] = abs(plan_dev) < PLAN_TOLERANCE
    for part, value in report.parts.items():
        print(f"  {part:<17}{value:>14,}  formula {report.formula.get(part, '-')!s:>12}")
    print(
        f"quantized parts {quantized:,} B = formula {formula:,} B; model.safetensors "
        f"{file_bytes:,} B, plan predicts {planned:,} B ({plan_dev:+.4%})"
    )
    bits = report.bits
    identity = abs(bits.effective_bits * bits.weights / 8 - quantized) <= 1e-6 * quantized
    checks["bits_identity"] = identity
    overhead = ", ".join(f"{k} {v:.4f}" for k, v in bits.overhead_bits.items())
    print(
        f"bits per weight: effective {bits.effective_bits:.4f} = nominal {bits.nominal_bits:.4f}"
        f" + overhead ({overhead}) over {bits.weights:,} weights"
    )
    out.update(pack=report.as_json(), plan_bytes=planned, plan_deviation=plan_dev)

    if not args.skip_ppl:
        datasets = [d.strip() for d in args.ppl.split(",")]
        results = {}
        for label, folder in (("unpacked", args.quant_dir), ("packed", packed)):
            ev = evaluate(str(folder), datasets, ctx=args.ctx, max_tokens=args.max_tokens)
            results[label] = {name: r.ppl for name, r in ev.results.items()}
            print(f"ppl {label:<9}" + "  ".join(f"{k} {v:.4f}" for k, v in results[label].items()))
        devs = {k: results["packed"][k] / results["unpacked"][k] - 1 for k in datasets}
        checks["ppl_within_0.1%"] = all(abs(v) < PPL_TOLERANCE for v in devs.values())
        print("ppl packed / unpacked - 1: " + ", ".join(f"{k} {v:+.4%}" for k, v in devs.items()))
        out.update(ppl=results, ppl_deviation=devs, ctx=args.ctx, max_tokens=args.max_tokens)

    out["checks"] = checks
    print("checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in checks.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
