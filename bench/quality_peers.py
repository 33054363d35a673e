"""One quantization of the quality bench, run as a child process (`bench/quality.py` starts it).

    python bench/quality_peers.py METHOD --model-dir DIR --calib CALIB.pt --out DIR ...

METHOD is rtn (our floor, product venv), gptq (llmcompressor), hqq, llamacpp or autoround
(peer venv).
Each writes into --out:
  * meta.json: quantized linear weights, their storage bits (codes, scales, zeros, packing
    padding: computed from the tensors or the format, never quoted), quantization seconds,
    library versions and notes;
  * weights.safetensors: de-quantized fp32 weights of the quantized linears, keyed by the HF
    parameter names, or model.gguf (llamacpp), de-quantized later by the evaluator.
On failure it writes error.txt (the exception's first line) and exits 1. Only torch,
safetensors and transformers are imported at the top: a peer's import error becomes its row.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

# The decoder's linear layers: what every method quantizes (embeddings / lm_head stay 16-bit).
LINEAR_NAME = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$")
GGUF_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\."
)
SHIPPED_SCALE_BITS = 16  # scales ship as fp16 / bf16 even when the run itself was in fp32


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_fp_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def quantized_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and LINEAR_NAME.match(name)
    ]
    assert found, "no decoder linear layers found"
    return found


def save_weights(out: Path, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in weights.items()}, out / "weights.safetensors")


def packed_storage_bits(rows: int, cols: int, bits: int, group: int) -> int:
    """One linear in GPTQ packing (compressed-tensors' pack-quantized, auto_round's export):
    codes packed in int32 along the input dim, one fp16 scale per group, zero points packed
    along the output dim (auto_round stores them for symmetric layers too, as 2^(b-1))."""
    groups = math.ceil(cols / group)
    return (
        rows * math.ceil(cols * bits / 32) * 32
        + rows * groups * SHIPPED_SCALE_BITS
        + groups * math.ceil(rows * bits / 32) * 32
    )


# --- rtn: our floor ---------------------------------------------------------------------------


def run_rtn(args, out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.quality_rtn import RtnConfig, rtn_roundtrip, rtn_storage_bits

    config = RtnConfig(bits=args.bits, group_size=args.group)
    model = load_fp_model(args.model_dir)
    weights, n, storage = {}, 0, 0
    start = time.perf_counter()
    for name, linear in quantized_linears(model):
        w = linear.weight.detach()
        weights[f"{name}.weight"] = rtn_roundtrip(w, config)
        n += w.numel()
        storage += rtn_storage_bits(tuple(w.shape), config)
    seconds = time.perf_counter() - start
    save_weights(out, weights)
    return {
        "linear_weights": n,
        "linear_storage_bits": storage,
        "bits_rule": f"{args.bits}-bit codes (ideal packing) + fp16 scale + fp16 zero per "
        f"group of {args.group} (a short last group pays a full scale + zero)",
        "quant_seconds": seconds,
        "library": f"liftq bench RTN (torch {torch.__version__})",
        "uses_calibration": False,
    }


# --- gptq: llm-compressor ---------------------------------------------------------------------


def run_gptq(args, out: Path) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    calib = torch.load(args.calib)
    model = load_fp_model(args.model_dir)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(
            num_bits=args.bits,
            type="int",
            symmetric=False,
            strategy="group",
            group_size=args.group,
        ),
    )
    recipe = GPTQModifier(
        config_groups={"group_0": scheme}, ignore=["lm_head"], block_size=128, dampening_frac=0.01
    )
    ids = calib.tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        max_seq_length=calib.shape[1],
        num_calibration_samples=calib.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    weights, n, storage = {}, 0, 0
    for name, linear in quantized_linears(model):
        rows, cols = linear.weight.shape
        assert linear.weight_scale.shape == (rows, math.ceil(cols / args.group)), name
        w = linear.weight.detach()
        # The weight left in the module must be on its group's grid: (w / s + z) integral and
        # within the 2^b codes, i.e. GPTQ's fake-quantized weight, not the fp one.
        scale = linear.weight_scale.detach().float().repeat_interleave(args.group, dim=1)
        zero = linear.weight_zero_point.detach().float().repeat_interleave(args.group, dim=1)
        grid = w.float() / scale[:, :cols] + zero[:, :cols]
        off = float((grid - grid.round()).abs().max())
        span = float(grid.round().max() - grid.round().min())
        assert off < 1e-2 and span <= 2**args.bits - 1, f"{name}: off grid ({off}, {span})"
        weights[f"{name}.weight"] = w
        n += w.numel()
        # compressed-tensors' pack-quantized format packs as GPTQ does
        storage += packed_storage_bits(rows, cols, args.bits, args.group)
    save_weights(out, weights)
    return {
        "linear_weights": n,
        "linear_storage_bits": storage,
        "bits_rule": f"pack-quantized: {args.bits}-bit codes packed in int32 + 16-bit scale "
        f"+ {args.bits}-bit packed zero point per group of {args.group}",
        "quant_seconds": seconds,
        "library": f"llmcompressor {version('llmcompressor')}, compressed-tensors "
        f"{version('compressed-tensors')}, transformers {version('transformers')}",
        "uses_calibration": True,
    }


# --- hqq ------------------------------------------------------------------------------------


def run_hqq(args, out: Path) -> dict:
    from hqq.core.quantize import Quantizer

    model = load_fp_model(args.model_dir)
    weights, n, storage = {}, 0, 0
    start = time.perf_counter()
    for name, linear in quantized_linears(model):
        w = linear.weight.detach()
        # HQQ's own settings for 2/3 bits (hqq_base_quant_config): optimized zero, axis 1.
        w_q, meta = Quantizer.quantize(
            w,
            nbits=args.bits,
            group_size=args.group,
            optimize=True,
            round_zero=False,
            axis=1,
            compute_dtype=torch.float16,
            device="cpu",
        )
        # HQQLinear keeps scale and zero in its compute dtype (fp16): decode with those.
        meta["scale"] = meta["scale"].half()
        meta["zero"] = meta["zero"].half()
        meta["compute_dtype"] = torch.float16
        weights[f"{name}.weight"] = Quantizer.dequantize(w_q, meta).float().view_as(w)
        n += w.numel()
        storage += (
            w_q.numel() * w_q.element_size() * 8
            + (meta["scale"].numel() + meta["zero"].numel()) * 16
        )
    seconds = time.perf_counter() - start
    save_weights(out, weights)
    return {
        "linear_weights": n,
        "linear_storage_bits": storage,
        "bits_rule": f"HQQ bit-packed codes as stored (3-bit: 10 codes per int32) + fp16 scale "
        f"+ fp16 zero per group of {args.group}",
        "quant_seconds": seconds,
        "library": f"hqq {version('hqq')}",
        "uses_calibration": False,
    }


# --- llama.cpp i-quants ------------------------------------------------------------------------


def _run_logged(cmd: list[str], log: Path, env: dict | None = None) -> None:
    with log.open("w") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        hint = next(
            (x for x in reversed(lines) if "error" in x.lower()), lines[-1] if lines else ""
        )
        raise RuntimeError(f"{Path(cmd[0]).name} exited {done.returncode}: {hint.strip()}")


def _cached(meta_path: Path, make) -> dict:
    """Run `make()` once per shared artefact (f32 GGUF, imatrix); its meta is kept beside it."""
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    start = time.perf_counter()
    info = make() or {}
    info["seconds"] = time.perf_counter() - start
    meta_path.write_text(json.dumps(info, indent=2))
    return info


def run_llamacpp(args, out: Path) -> dict:
    import gguf

    llama = Path(args.llama_dir)
    src = llama / "src" / "vendor" / "llama.cpp"
    tools = llama / "build" / "bin"
    for needed in (
        src / "convert_hf_to_gguf.py",
        tools / "llama-imatrix",
        tools / "llama-quantize",
    ):
        if not needed.exists():
            build_log = llama.parent / "setup.log"
            raise FileNotFoundError(
                f"{needed} is missing: llama.cpp was not built (see {build_log}; run "
                f"bench/setup_peers.sh)"
            )
    # One f32 GGUF and imatrix per calibration (text and window length), shared by the types.
    calib_key = hashlib.sha256(args.calib_text.read_bytes() + str(args.seqlen).encode())
    shared = out.parent / f"llamacpp-shared-{calib_key.hexdigest()[:12]}"
    shared.mkdir(parents=True, exist_ok=True)
    f32 = shared / "model-f32.gguf"
    imatrix = shared / "imatrix.gguf"
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))

    def convert():
        _run_logged(
            [sys.executable, str(src / "convert_hf_to_gguf.py"), str(args.model_dir),
             "--outfile", str(f32), "--outtype", "f32"],
            shared / "convert.log",
            env,
        )  # fmt: skip

    def make_imatrix():
        _run_logged(
            [str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(args.calib_text),
             "-o", str(imatrix), "-c", str(args.seqlen), "-b", str(args.seqlen),
             "-t", str(os.cpu_count() or 1), "--no-ppl"],
            shared / "imatrix.log",
        )  # fmt: skip

    _cached(shared / "convert.json", convert)
    imatrix_info = _cached(shared / "imatrix.json", make_imatrix)
    target = out / "model.gguf"
    start = time.perf_counter()
    # Token embedding kept at f16 like every other row (the output matrix is tied to it).
    _run_logged(
        [str(tools / "llama-quantize"), "--imatrix", str(imatrix),
         "--token-embedding-type", "f16", str(f32), str(target), args.ftype,
         str(os.cpu_count() or 1)],
        out / "quantize.log",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    sdist = next((p.name for p in (llama / "sdist").glob("*.tar.gz")), "llama-cpp-python sdist")
    reader = gguf.GGUFReader(target)
    n, storage, types = 0, 0, {}
    for tensor in reader.tensors:
        if GGUF_LINEAR.match(tensor.name):
            n += int(tensor.n_elements)
            storage += int(tensor.n_bytes) * 8
            kind = tensor.tensor_type.name
            types[kind] = types.get(kind, 0) + 1
    return {
        "linear_weights": n,
        "linear_storage_bits": storage,
        "bits_rule": "bytes of the decoder linear tensors in the quantized GGUF (block scales "
        "included); tensor types: " + ", ".join(f"{k} x{v}" for k, v in sorted(types.items())),
        "gguf_tensor_types": types,
        "quant_seconds": seconds + float(imatrix_info.get("seconds", 0.0)),
        "imatrix_seconds": imatrix_info.get("seconds"),
        "library": f"llama.cpp tools built from {sdist}, gguf {version('gguf')}",
        "uses_calibration": True,
        "gguf": str(target),
    }


# --- autoround ---------------------------------------------------------------------------------


def _autoround_grid(linear, name: str) -> tuple[torch.Tensor, int]:
    """The weight AutoRound's kernel decodes, from the module it leaves behind: integer codes
    recovered from its fake-quantized weight, times its fp16 per-group scale (and zero point)
    in fp32 (the module keeps a bf16 copy, coarser than the shipped scale x code). Returns the
    weight and the layer's group size."""
    bits, group = int(linear.bits), int(linear.group_size)
    rows, cols = linear.weight.shape
    w = linear.weight.detach().float()
    scale = linear.scale.detach().float().reshape(rows, -1)
    assert scale.shape[1] == math.ceil(cols / group), f"{name}: scale shape {tuple(scale.shape)}"
    scale = scale.repeat_interleave(group, dim=1)[:, :cols]
    if linear.sym:  # q in [-2^(b-1), 2^(b-1) - 1], w = s q
        low, high, zero = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, torch.zeros_like(scale)
    else:  # q in [0, 2^b - 1], w = s (q - z)
        zp = torch.as_tensor(linear.zp).detach().float().reshape(rows, -1)
        low, high, zero = 0, 2**bits - 1, zp.repeat_interleave(group, dim=1)[:, :cols]
    grid = w / scale + zero
    codes = grid.round()
    off = float((grid - codes).abs().max())
    assert off < 0.1 and codes.min() >= low and codes.max() <= high, f"{name}: off grid ({off})"
    return scale * (codes - zero), group


def _autoround_text_calibration(calib: torch.Tensor, tokenizer, path: Path) -> int:
    """AutoScheme (auto-round 0.16.1) takes calibration only as a dataset name or a local
    .json path, so the windows go in as text: window i decoded with the first 64 tokens of the
    next (auto-round truncates at seqlen and drops shorter samples). Returns how many windows
    re-tokenize to exactly the same ids."""
    n, seqlen = calib.shape
    texts, same = [], 0
    for i in range(n):
        ids = calib[i].tolist() + calib[(i + 1) % n][:64].tolist()
        text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        same += (
            tokenizer(text, truncation=True, max_length=seqlen)["input_ids"] == calib[i].tolist()
        )
        texts.append(text)
    path.write_text(json.dumps(texts))
    return same


def run_autoround(args, out: Path) -> dict:
    from auto_round import AutoRound, AutoScheme
    from transformers import AutoTokenizer

    calib = torch.load(args.calib)
    model = load_fp_model(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    preset = f"W{args.bits}A16G{args.group}"
    scheme, dataset = preset, [calib[i : i + 1] for i in range(calib.shape[0])]
    calibration = f"{calib.shape[0]} token windows of {calib.shape[1]}"
    if args.avg_bits:  # AutoScheme: per-layer mix of the options at this average (scales incl.)
        scheme = AutoScheme(avg_bits=args.avg_bits, options=f"{preset},W4A16G{args.group}")
        out.mkdir(parents=True, exist_ok=True)
        dataset = out / "calibration.json"
        same = _autoround_text_calibration(calib, tokenizer, dataset)
        dataset = str(dataset)
        calibration += f" as text ({same} re-tokenize to the same ids)"
    start = time.perf_counter()
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme=scheme,
        dataset=dataset,
        nsamples=calib.shape[0],
        seqlen=calib.shape[1],
        iters=args.iters,
        batch_size=min(8, calib.shape[0]),
        device_map="cpu",
        seed=args.seed,
    )
    model, _ = rounder.quantize()
    seconds = time.perf_counter() - start
    weights, n, storage, mix = {}, 0, 0, {}
    for name, linear in quantized_linears(model):
        rows, cols = linear.weight.shape
        bits = int(linear.bits)
        w, group = _autoround_grid(linear, name)
        storage += packed_storage_bits(rows, cols, bits, group)
        weights[f"{name}.weight"] = w
        n += w.numel()
        kind = f"W{bits}A16G{group}" + ("" if linear.sym else " asym")
        mix[kind] = mix.get(kind, 0) + 1
    save_weights(out, weights)
    return {
        "linear_weights": n,
        "linear_storage_bits": storage,
        "bits_rule": "auto_round export format: int32-packed codes + fp16 scale + packed zero "
        "point per group; layer schemes: " + ", ".join(f"{k} x{v}" for k, v in sorted(mix.items())),
        "layer_schemes": mix,
        "quant_seconds": seconds,
        "calibration": calibration,
        "library": f"auto-round {version('auto-round')}, transformers {version('transformers')}",
        "uses_calibration": True,
    }


METHODS = {
    "rtn": run_rtn,
    "gptq": run_gptq,
    "hqq": run_hqq,
    "llamacpp": run_llamacpp,
    "autoround": run_autoround,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib", type=Path, help="int64 [n, seqlen] token windows (torch.save)")
    parser.add_argument("--calib-text", type=Path, help="the same windows as text (llama.cpp)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--ftype", default="IQ2_XS", help="llama-quantize type (llamacpp)")
    parser.add_argument("--llama-dir", type=Path, help="bench/.venv-peers/llama.cpp")
    parser.add_argument("--iters", type=int, default=200, help="steps per block (autoround)")
    parser.add_argument(
        "--avg-bits", type=float, default=0.0, help="AutoScheme average (autoround)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    for stale in ("meta.json", "error.txt"):
        (args.out / stale).unlink(missing_ok=True)
    try:
        meta = METHODS[args.method](args, args.out)
    except Exception as exc:  # any failure becomes the row's reason
        traceback.print_exc()
        text = str(exc).strip().splitlines()
        reason = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
        (args.out / "error.txt").write_text(reason + "\n")
        return 1
    meta["method"] = args.method
    meta["python"] = sys.executable
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
