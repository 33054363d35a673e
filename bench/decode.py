"""Decode speed of a packed LiftQuant model against the same model with dense fp16 weights.

One run prints, side by side: greedy-decode tokens/s of both models (HF `generate`, KV cache,
batch 1), and for every linear kind of block 0 the time of one token through the dense fp16
layer and through the packed layer (the whole layer, and its two stages: the activation lift
and the 1-bit GEMV). On CUDA the packed layers run the Triton kernels; on CPU the torch path
(byte lookup tables for decode). The device, backend and library versions head the output.

The model is either a packed folder (`--model PACKED_DIR`; the dense baseline is its
dequantized weights in fp16) or a synthetic one (`--synthetic smollm2-135m --config LQ-24/10`:
the architecture of a plan preset with random weights and random codes; speed does not depend
on the values), which needs no files, e.g. on a GPU machine. Every preset's shapes run on the
kernels: on CUDA the script refuses to report if any packed layer would not take the Triton
path. `--layers N` keeps the first N blocks of a synthetic model (the per-layer table is
block 0 either way; tokens/s is then that of the N-block model, said in the output) and
`--vocab V` shrinks its vocabulary, so a 70B preset's shapes fit a small machine.

Usage:
  python bench/decode.py --model /work/out/smollm2-LQ-24-10-packed [--device cpu]
  python bench/decode.py --synthetic smollm2-135m --config LQ-24/10 --device cuda
  python bench/decode.py --synthetic llama-3-70b --layers 2 --device cuda
Options: --dtype float16 --new-tokens 32 --prompt-tokens 16 --reps 50 --prefill-rows 512
         (0: no prefill timing) --layers N --vocab V --threads N --json PATH
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import liftq_cli  # noqa: F401  (registers the packed format with transformers)
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.runtime.linear import LiftQuantLinear, replace_linears
from liftq_kernels.ops import lut_bitmm, pick_backend
from liftq_kernels.reference import WORD_BITS, in_code_order, lift_ref

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds per call over 5 blocks of `reps` calls, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def synthetic(
    arch_name: str,
    cfg: LatticeConfig,
    dtype: torch.dtype,
    device: torch.device,
    layers: int | None = None,
    vocab: int | None = None,
):
    """(dense model, packed model) of a preset architecture with random weights and codes
    (the first `layers` blocks, a `vocab`-token vocabulary when given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from liftq_cli.plan.architectures import resolve_architecture
    from liftq_cli.quant.whitening import orthogonal_init

    arch = resolve_architecture(arch_name)
    config = LlamaConfig(
        vocab_size=vocab or arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=min(layers or arch.num_layers, arch.num_layers),
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tie_embeddings,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).to(dtype).eval()
    packed = copy.deepcopy(dense)
    names = [n for n, m in packed.named_modules() if n.rpartition(".")[2] in KINDS]
    replace_linears(packed, dict.fromkeys(names, cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        packed.liftq_lattice.get_buffer(f"D{cfg.D}_d{cfg.d}").copy_(
            torch.randn(cfg.d, cfg.D, generator=g) / cfg.D**0.5
        )
        for module in packed.modules():
            if isinstance(module, LiftQuantLinear):
                module.qweight.copy_(
                    torch.randint(-(2**31), 2**31, module.qweight.shape, generator=g)
                )
                module.qscale.copy_(torch.full_like(module.qscale, 0.02))
                module.s1.fill_(1.0)
                module.s2.fill_(1.0)
                for name in ("p1", "p2"):
                    if f"{name}_signs" in module._buffers:  # a Hadamard factor: its signs
                        signs = module.get_buffer(f"{name}_signs")
                        signs.copy_(torch.randint(0, 2, signs.shape, generator=g) * 2 - 1)
                    else:
                        factor = module.get_buffer(name)
                        factor.copy_(orthogonal_init(factor.shape[0], g))
    return dense.to(device), packed.to(device).eval()


def from_packed(folder: Path, dtype: torch.dtype, device: torch.device):
    """(dense model from the dequantized codes, packed model) of a packed folder."""
    from transformers import AutoModelForCausalLM

    packed = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    dense = copy.deepcopy(packed)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LiftQuantLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            linear.weight.data = module.dequantize().to(dtype)
            if module.bias is not None:
                linear.bias.data = module.bias.data.to(dtype)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    del dense.liftq_lattice
    return dense.to(device), packed.to(device)


def stage_fns(mod: LiftQuantLinear, x: torch.Tensor, backend: str, dtype: torch.dtype):
    """(lift, gemv) callables of one packed layer for input x [1, in]."""
    words, scale, *args = mod.kernel_args()
    if backend == "triton":
        from liftq_kernels.bitgemv import bitgemv
        from liftq_kernels.lift import lift

        k_padded = words.shape[1] * WORD_BITS
        z, z_scale = lift(x, *args, k_padded)
        return (
            lambda: lift(x, *args, k_padded),
            lambda: bitgemv(z, z_scale, words, scale, out_dtype=dtype),
        )
    z = in_code_order(lift_ref(x, *args), words.shape[1])
    return lambda: lift_ref(x, *args), lambda: lut_bitmm(z, words, scale)


def time_layer(base: nn.Linear, mod: LiftQuantLinear, backend: str, dtype, device, reps, prefill):
    x = torch.randn(1, mod.in_features, device=device, dtype=dtype)
    xs = torch.randn(prefill, mod.in_features, device=device, dtype=dtype)
    lift_fn, gemv_fn = stage_fns(mod, x, backend, dtype)
    with torch.no_grad():
        prefill = {
            "prefill_dense_us": seconds(lambda: base(xs), device, reps) * 1e6 if len(xs) else 0,
            "prefill_packed_us": seconds(lambda: mod(xs), device, reps) * 1e6 if len(xs) else 0,
        }
        return {
            **prefill,
            "out": mod.out_features,
            "in": mod.in_features,
            "config": mod.cfg.name,
            "dense_us": seconds(lambda: base(x), device, reps) * 1e6,
            "packed_us": seconds(lambda: mod(x), device, reps) * 1e6,
            "lift_us": seconds(lift_fn, device, reps) * 1e6,
            "gemv_us": seconds(gemv_fn, device, reps) * 1e6,
            "dense_bytes": base.weight.numel() * base.weight.element_size(),
            "code_bytes": mod.qweight.numel() * 4,
        }


def layer_times(dense, packed, device, dtype, reps: int, backend: str, prefill: int):
    """Time of every linear kind of block 0, dense vs packed: one token (lift + 1-bit GEMV)
    and `prefill` tokens at once (the prefill path). Returns one dict per kind."""
    rows = []
    for kind in KINDS:
        name = f"{'self_attn' if kind in KINDS[:4] else 'mlp'}.{kind}"
        base = dense.model.layers[0].get_submodule(name)
        mod = packed.model.layers[0].get_submodule(name)
        times = time_layer(base, mod, backend, dtype, device, reps, prefill)
        rows.append({"kind": kind, **times})
    return rows


def tokens_per_second(model, device, vocab: int, prompt: int, new: int) -> dict:
    """Greedy generate at batch 1: decode tokens/s (prefill excluded) and prefill seconds."""
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        assert out.shape[1] == prompt + n
        return time.perf_counter() - start

    run(2)  # warm-up (autotuning, allocator)
    first = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new) for _ in range(3))
    return {"decode_tok_s": (new - 1) / max(full - first, 1e-9), "prefill_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="packed folder (liftq pack --out)")
    source.add_argument("--synthetic", help="plan preset, e.g. smollm2-135m (random weights)")
    parser.add_argument("--config", default="LQ-24/10", help="lattice config for --synthetic")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--prefill-rows", type=int, default=512, help="tokens per prefill call")
    parser.add_argument("--layers", type=int, default=None, help="blocks of a synthetic model")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary of a synthetic model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.model is not None:
        dense, packed = from_packed(args.model, dtype, device)
        label = str(args.model)
    else:
        cfg = LatticeConfig.parse(args.config)
        dense, packed = synthetic(args.synthetic, cfg, dtype, device, args.layers, args.vocab)
        blocks = dense.config.num_hidden_layers
        label = f"{args.synthetic} (synthetic, random codes, {blocks} blocks"
        label += f", vocab {dense.config.vocab_size})"
    probe = torch.empty(1, device=device)
    backend = pick_backend(probe)
    if device.type == "cuda" and backend != "triton":
        raise SystemExit(
            f"packed layers on CUDA would take the '{backend}' path: unset LIFTQ_BACKEND"
        )
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if backend == "triton":
        import triton

        versions += f", triton {triton.__version__}"
    print(f"model: {label}; activations {args.dtype}; device: {where}; packed backend: {backend}")
    print(versions)
    rows = layer_times(dense, packed, device, dtype, args.reps, backend, args.prefill_rows)
    vocab = dense.config.vocab_size
    speed = {
        name: tokens_per_second(model, device, vocab, args.prompt_tokens, args.new_tokens)
        for name, model in (("dense", dense), ("packed", packed))
    }
    print(
        f"\nper-layer time (block 0), microseconds: one token (dense | packed = lift + gemv) "
        f"and {args.prefill_rows} tokens (prefill); dense = {args.dtype} weights"
    )
    header = (
        f"{'layer':<10}{'out x in':>12}{'config':>10}{'dense':>10}{'packed':>10}"
        f"{'= lift':>9}{'+ gemv':>10}{'dense B':>14}{'codes B':>13}"
        f"{'prefill dense':>15}{'packed':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['kind']:<10}{r['out']:>6}x{r['in']:<5}{r['config']:>10}{r['dense_us']:>10.1f}"
            f"{r['packed_us']:>10.1f}{r['lift_us']:>9.1f}{r['gemv_us']:>10.1f}"
            f"{r['dense_bytes']:>14,}{r['code_bytes']:>13,}"
            f"{r['prefill_dense_us']:>15.1f}{r['prefill_packed_us']:>10.1f}"
        )
    print(
        f"\ndecode tokens/s (batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new "
        f"tokens, greedy): dense {speed['dense']['decode_tok_s']:.1f}, packed "
        f"{speed['packed']['decode_tok_s']:.1f}"
    )
    if args.json is not None:
        payload = {
            "model": label,
            "device": where,
            "backend": backend,
            "dtype": args.dtype,
            "versions": versions,
            "layers": rows,
            "tokens": speed,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
