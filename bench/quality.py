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
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/quality.py` puts bench/, not the root, on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the path set-up above
from bench.quality_liftq import prepare_liftq_row  # noqa: E402
from bench.quality_report import TEXTS, Row, markdown, regressions, table_rows  # noqa: E402

MODEL = "smollm2-135m"
CTX = 1024
FULL_TOKENS = 40960
QUICK_TOKENS = 4096
# Calibration windows are drawn after this many `wiki` tokens, so they never overlap the
# `wiki` evaluation prefix, whatever --max-tokens is (quick and full runs share them).
CALIB_OFFSET = FULL_TOKENS
PEER_VENV = ROOT / "bench" / ".venv-peers"
WORK = ROOT / "bench" / "work" / "quality"
RESULTS = ROOT / "bench" / "results"
CHILD = ROOT / "bench" / "quality_peers.py"
CHILD_CODE = (CHILD, ROOT / "bench" / "quality_rtn.py")
CHILD_TIMEOUT_S = 3 * 3600
FINETUNE_STEPS = 48  # liftq -ft rows: 4 fresh windows per step (FinetuneConfig.batch)
LONG_FINETUNE_STEPS, LONG_FINETUNE_LR = 96, 2e-3  # the -ft96 row
LIFTQ_ONLY = ("finetune_steps", "finetune_lr", "mixed")  # Spec fields no peer row's key has
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


@dataclass(frozen=True)
class Spec:
    """What one row runs. venv: 'product' (this interpreter) or 'peers'."""

    id: str
    method: str
    setting: str
    venv: str = "product"
    bits: int = 0
    group: int = 0
    ftype: str = ""
    target_bits: float = 0.0  # liftq rows: the requested fractional bit-width
    finetune_steps: int = 0  # liftq -ft rows: `--finetune-steps` (block stage shared)
    finetune_lr: float = 0.0  # liftq rows: `--finetune-lr` when set (else the CLI default)
    mixed: bool = False  # liftq -mixed rows: `--mixed` (same average bits, spread by sensitivity)


def all_specs() -> list[Spec]:
    specs = [Spec("fp", "fp", "de-quantized fp32 (reference)")]
    for bits in (2, 3, 4):
        for group in (64, 128):
            setting = f"{bits}-bit g{group} min/max"
            specs.append(Spec(f"rtn-b{bits}-g{group}", "rtn", setting, "product", bits, group))
    for bits in (2, 3):
        specs.append(Spec(f"gptq-b{bits}-g64", "gptq", f"{bits}-bit g64 asym", "peers", bits, 64))
    for bits in (2, 3):
        specs.append(Spec(f"hqq-b{bits}-g64", "hqq", f"{bits}-bit g64", "peers", bits, 64))
    for ftype, nominal in (("IQ2_XS", 2.31), ("IQ2_S", 2.5), ("IQ2_M", 2.7), ("IQ3_XXS", 3.06)):
        setting = f"{ftype} ({nominal} nominal) + imatrix"
        specs.append(Spec(f"llamacpp-{ftype}", "llamacpp", setting, "peers", ftype=ftype))
    for bits in (2.0, 2.4, 2.5, 3.0):
        specs.append(Spec(f"liftq-{bits:.1f}", "liftq", f"{bits:.1f} bits", target_bits=bits))
    for bits in (2.0, 2.4, 2.5, 3.0):
        setting = f"{bits:.1f} bits + {FINETUNE_STEPS}-step fine-tuning"
        specs.append(
            Spec(
                f"liftq-{bits:.1f}-ft",
                "liftq",
                setting,
                target_bits=bits,
                finetune_steps=FINETUNE_STEPS,
            )
        )
    for tuned in (False, True):  # 3.0 bits spread by sensitivity (`liftq quantize --mixed`)
        steps = FINETUNE_STEPS if tuned else 0
        setting = "3.0 bits, mixed by sensitivity" + (f" + {steps}-step fine-tuning" * tuned)
        specs.append(
            Spec(
                "liftq-3.0-mixed" + "-ft" * tuned,
                "liftq",
                setting,
                target_bits=3.0,
                finetune_steps=steps,
                mixed=True,
            )
        )
    specs.append(  # the longer schedule: twice the steps at twice the peak rate
        Spec(
            f"liftq-3.0-mixed-ft{LONG_FINETUNE_STEPS}",
            "liftq",
            f"3.0 bits, mixed by sensitivity + {LONG_FINETUNE_STEPS}-step fine-tuning at lr "
            f"{LONG_FINETUNE_LR}",
            target_bits=3.0,
            finetune_steps=LONG_FINETUNE_STEPS,
            finetune_lr=LONG_FINETUNE_LR,
            mixed=True,
        )
    )
    return specs


def select(specs: list[Spec], patterns: str | None) -> list[Spec]:
    if not patterns:
        return specs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatch(s.id, p) or s.method == p for p in wanted)]
    if not chosen:
        ids = ", ".join(s.id for s in specs)
        raise SystemExit(f"error: --rows '{patterns}' matches no row; rows are: {ids}")
    return chosen


# --- shared inputs -----------------------------------------------------------------------------


@dataclass
class Inputs:
    folder: Path
    tokenizer: object
    eval_ids: dict[str, torch.Tensor]
    calib_pt: Path
    calib_txt: Path
    tuning_txt: Path  # `wiki` past the evaluation prefix: the -ft rows' fine-tuning text
    calib_fingerprint: str
    seqlen: int
    seed: int


def prepare(args: argparse.Namespace) -> Inputs:
    from liftq_cli.data.calibration import sample_windows, tokenize
    from liftq_cli.data.text import load_text
    from liftq_cli.io.checkpoints import load_tokenizer, materialize, resolve

    folder = materialize(resolve(MODEL))
    tokenizer = load_tokenizer(folder)
    texts = {name: tokenize(tokenizer, load_text(name).text) for name in TEXTS}
    eval_ids = {name: ids[: args.max_tokens] for name, ids in texts.items()}
    windows = sample_windows(texts["wiki"][CALIB_OFFSET:], args.nsamples, args.seqlen, args.seed)
    fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    calib_dir = WORK / f"calib-{fingerprint}"
    calib_dir.mkdir(parents=True, exist_ok=True)
    calib_pt, calib_txt = calib_dir / "windows.pt", calib_dir / "windows.txt"
    if not calib_pt.is_file():
        torch.save(windows, calib_pt)
        calib_txt.write_text("\n\n".join(tokenizer.decode(w) for w in windows.tolist()))
    tuning_txt = WORK / f"wiki-after-{CALIB_OFFSET}.txt"
    if not tuning_txt.is_file():
        tuning_txt.write_text(tokenizer.decode(texts["wiki"][CALIB_OFFSET:].tolist()))
    return Inputs(
        folder,
        tokenizer,
        eval_ids,
        calib_pt,
        calib_txt,
        tuning_txt,
        fingerprint,
        args.seqlen,
        args.seed,
    )


# --- quantization children ---------------------------------------------------------------------


def run_child(cmd: list[str], log: Path, timeout_s: float) -> tuple[int, float, float]:
    """Run `cmd`; return (exit status, wall seconds, peak RSS in MB of it and its children)."""
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # rusage of this child alone
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024


def first_error_line(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return lines[-1] if lines else "no output"


def quantize(spec: Spec, inputs: Inputs, row: Row) -> Path | None:
    """Run the row's child once per settings (reused afterwards); return its work dir."""
    python = Path(sys.executable) if spec.venv == "product" else PEER_VENV / "bin" / "python"
    if not python.exists():
        row.status, row.reason = (
            "failed",
            (
                f"peer venv {PEER_VENV.relative_to(ROOT)} is missing: run bench/setup_peers.sh "
                f"(make bench-quality does)"
            ),
        )
        return None
    settings = {
        # the liftq-only fields came after these rows were keyed: left out, so adding them
        # did not re-run every peer
        "spec": {k: v for k, v in spec.__dict__.items() if k not in LIFTQ_ONLY},
        "model": str(inputs.folder),
        "calib": inputs.calib_fingerprint,
        "seed": inputs.seed,
        "python": str(python),
        # the quantizing code itself: editing it re-runs the rows it may have changed
        "code": [hashlib.sha256(f.read_bytes()).hexdigest() for f in CHILD_CODE],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = WORK / f"{spec.id}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / "run.json"
    if (out / "meta.json").is_file() and run_file.is_file():
        row.reused = True
    else:
        cmd = [
            str(python), str(CHILD), spec.method, "--model-dir", str(inputs.folder),
            "--out", str(out), "--calib", str(inputs.calib_pt),
            "--calib-text", str(inputs.calib_txt), "--seqlen", str(inputs.seqlen),
            "--bits", str(spec.bits), "--group", str(spec.group), "--ftype", spec.ftype or "none",
            "--llama-dir", str(PEER_VENV / "llama.cpp"), "--seed", str(inputs.seed),
        ]  # fmt: skip
        print(f"[{spec.id}] quantizing ({python.parent.parent.name}) ...", flush=True)
        code, wall, rss = run_child(cmd, out / "child.log", CHILD_TIMEOUT_S)
        run_file.write_text(json.dumps({"exit": code, "wall_s": wall, "peak_rss_mb": rss}))
    run = json.loads(run_file.read_text())
    row.child_seconds, row.peak_rss_mb = run["wall_s"], run["peak_rss_mb"]
    if not (out / "meta.json").is_file():
        error = out / "error.txt"
        reason = error.read_text().strip() if error.is_file() else ""
        row.status = "failed"
        row.reason = reason or f"exit {run['exit']}: {first_error_line(out / 'child.log')}"
        return None
    meta = json.loads((out / "meta.json").read_text())
    row.quant_seconds = meta["quant_seconds"]
    row.bits_per_weight = meta["linear_storage_bits"] / meta["linear_weights"]
    row.bits_rule, row.library = meta["bits_rule"], meta["library"]
    row.total_bytes = meta["linear_storage_bits"] // 8  # the rest is added by the evaluator
    row.status = "quantized"
    return out


# --- evaluation --------------------------------------------------------------------------------


class Evaluator:
    """The fp32 model loaded once; each row's weights are swapped in, measured, swapped out."""

    def __init__(self, inputs: Inputs) -> None:
        from liftq_cli.io.checkpoints import load_model

        self.inputs = inputs
        self.model = load_model(MODEL).model
        self.params = dict(self.model.state_dict())
        self.total_params = sum(p.numel() for p in self.model.parameters())  # tied once
        self.linear_weights = sum(
            t.numel() for k, t in self.params.items() if LINEAR_WEIGHT.match(k)
        )

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Weight shapes (out, in) of the decoder linears every method quantizes."""
        return {k: tuple(t.shape) for k, t in self.params.items() if LINEAR_WEIGHT.match(k)}

    def overrides(self, out: Path) -> dict[str, torch.Tensor]:
        if (out / "model.gguf").is_file():
            return self._from_gguf(out / "model.gguf")
        from safetensors import safe_open

        if (out / "liftq.json").is_file():  # a whole fake-quantised HF folder: take its linears
            with safe_open(out / "model.safetensors", framework="pt") as handle:
                names = [k for k in handle.keys() if LINEAR_WEIGHT.match(k)]  # noqa: SIM118 - not iterable
                assert len(names) == len(self.shapes()), f"{out} lacks decoder linears"
                return {k: handle.get_tensor(k).float() for k in names}
        from safetensors.torch import load_file

        return load_file(out / "weights.safetensors")

    def _from_gguf(self, path: Path) -> dict[str, torch.Tensor]:
        """De-quantize a GGUF (gguf-py, numpy) through transformers' loader into HF names."""
        from transformers import AutoModelForCausalLM

        from liftq_cli.io.checkpoints import quiet_transformers

        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        state = {k: v for k, v in model.state_dict().items() if k in self.params}
        missing = [k for k in self.params if k not in state]
        assert not missing, f"GGUF lacks {missing[:3]}"
        return state

    def cache_file(self, row: Row, out: Path | None) -> Path:
        """Where this row's perplexities are kept: keyed by the evaluation protocol (context,
        the exact token ids of each text) and the identity of the weights file measured."""
        weights = (
            [] if out is None else sorted(out.glob("*.safetensors")) + sorted(out.glob("*.gguf"))
        )
        key = {
            "ctx": CTX,
            "texts": {
                t: hashlib.sha256(ids.numpy().tobytes()).hexdigest()
                for t, ids in self.inputs.eval_ids.items()
            },
            "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights],
            "row": row.id if out is None else str(out.resolve()),
            "base": [
                (f.name, f.stat().st_size) for f in sorted(self.inputs.folder.glob("*.safetensors"))
            ],
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return WORK / "eval-cache" / f"{row.id}-{digest}.json"

    def measure(self, row: Row, out: Path | None, progress: bool = True) -> None:
        cache = self.cache_file(row, out)
        if cache.is_file():  # the same weights on the same tokens: reuse the measurement
            saved_ppl = json.loads(cache.read_text())
            row.ppl, row.eval_seconds = saved_ppl["ppl"], saved_ppl["eval_seconds"]
            row.eval_reused = True
            if progress:
                print(f"[{row.id}] ppl {row.ppl} (reused from {cache.name})", flush=True)
        else:
            self._measure(row, out, progress)
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"ppl": row.ppl, "eval_seconds": row.eval_seconds}
            cache.write_text(json.dumps(payload))
        if row.method == "fp":
            row.bits_per_weight, row.total_bytes = 32.0, self.total_params * 4
        else:
            rest = self.total_params - self.linear_weights
            row.total_bytes = (row.total_bytes or 0) + rest * 2
        row.status = "ok"

    def _measure(self, row: Row, out: Path | None, progress: bool) -> None:
        from liftq_cli.evaluate.perplexity import perplexity

        overrides = self.overrides(out) if out is not None else {}
        for name, tensor in overrides.items():
            assert self.params[name].shape == tensor.shape, (name, tensor.shape)
        saved = {name: self.params[name].clone() for name in overrides}
        start = time.perf_counter()
        try:
            with torch.no_grad():
                for name, tensor in overrides.items():
                    self.params[name].copy_(tensor)
            for text, ids in self.inputs.eval_ids.items():
                row.ppl[text] = perplexity(self.model, ids, CTX).ppl
                if progress:
                    print(f"[{row.id}] ppl {text} = {row.ppl[text]:.3f}", flush=True)
        finally:
            with torch.no_grad():
                for name, tensor in saved.items():
                    self.params[name].copy_(tensor)
        row.eval_seconds = time.perf_counter() - start


# --- main --------------------------------------------------------------------------------------


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
        f"{args.max_tokens} tokens of WikiText-2 test and of `wiki`; every row's de-quantized "
        f"weights loaded into the same HF model (fp32 compute).",
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
        "rows": [r.as_dict() for r in rows],
        "regression_check": {"failures": failures, "notes": notes},
    }
    (args.results / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(rows, lines) + "\n" + "\n".join(f"- {x}" for x in failures + notes) + "\n"
    (args.results / "quality.md").write_text(md)
    print_table(rows, lines[0].lstrip("# "))
    for line in failures + notes:
        print(line)
    print(f"wrote {args.results / 'quality.json'} and {args.results / 'quality.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
