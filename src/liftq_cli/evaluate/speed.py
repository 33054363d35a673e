"""`liftq eval --speed`: prefill and decode tokens/s and peak memory on the current device.

Prefill: one forward pass over `batch` x `prompt` random token ids (the KV cache on), timed
after a warm-up; tokens/s = batch * prompt / seconds. Decode: greedy `generate` of `new`
tokens after the same prompt minus `generate` of 1 token, so prefill is excluded;
tokens/s = batch * (new - 1) / seconds. Medians of 3 runs. Peak memory: on CUDA
`torch.cuda.max_memory_allocated` from the model's load to the end of the run (weights, KV
cache and activations; the CUDA context is not in it), on the CPU the process's peak resident
set (everything the process holds, including the Python runtime).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class SpeedResult:
    device: str
    dtype: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    peak_bytes: int
    peak_kind: str  # "cuda allocated" or "host peak RSS"

    def as_dict(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_peak_bytes() -> int:
    """Peak resident set of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def measure_speed(
    model: torch.nn.Module,
    vocab: int,
    prompt: int = 128,
    new: int = 32,
    batch: int = 1,
) -> SpeedResult:
    """Tokens/s of `model` (already on its device, eval mode) and its peak memory.

    `vocab`: token ids are drawn from [0, vocab). Raises ValueError for new < 2 or
    prompt < 1 (callers validate user input first).
    """
    if new < 2 or prompt < 1 or batch < 1:
        raise ValueError(f"measure_speed: prompt={prompt}, new={new}, batch={batch}")
    param = next(model.parameters())
    device = param.device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=generator).to(device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def generate(n: int) -> None:
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == prompt + n

    with torch.inference_mode():
        model(ids)  # warm-up: kernels, autotuning, allocator
        generate(2)
        prefill = _median_seconds(lambda: model(ids), device)
        first = _median_seconds(lambda: generate(1), device)
        full = _median_seconds(lambda: generate(new), device)
    if device.type == "cuda":
        peak, kind = int(torch.cuda.max_memory_allocated(device)), "cuda allocated"
    else:
        peak, kind = host_peak_bytes(), "host peak RSS"
    return SpeedResult(
        device=str(device),
        dtype=str(param.dtype).removeprefix("torch."),
        batch=batch,
        prompt_tokens=prompt,
        new_tokens=new,
        prefill_tok_s=batch * prompt / max(prefill, 1e-9),
        decode_tok_s=batch * (new - 1) / max(full - first, 1e-9),
        peak_bytes=peak,
        peak_kind=kind,
    )


@dataclass
class SpeedReport:
    model: SpeedResult
    reference: SpeedResult | None = None
    planned_bytes: int | None = None  # `liftq plan`'s GPU bytes for this ctx and batch

    def as_dict(self) -> dict:
        out = {"model": self.model.as_dict()}
        if self.reference is not None:
            out["reference"] = self.reference.as_dict()
        if self.planned_bytes is not None:
            out["planned_bytes"] = self.planned_bytes
        return out


def run_speed(
    loaded: torch.nn.Module,
    reference: torch.nn.Module | None,
    device: torch.device,
    vocab: int,
    prompt: int,
    new: int,
    batch: int,
) -> SpeedReport:
    """Measure the model, then (moved to the device after the model left it) the reference.

    Models run in fp16 on CUDA and float32 on the CPU (no fast fp16 matmuls there). On the CPU
    the reference's peak is the process peak after both runs, so it is only an upper bound.
    """
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    results = []
    for model in (loaded, reference):
        if model is None:
            continue
        model.to(device=device, dtype=dtype).eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        results.append(measure_speed(model, vocab, prompt, new, batch))
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return SpeedReport(model=results[0], reference=results[1] if len(results) > 1 else None)


def planned_gpu_bytes(folder: Path, ctx: int, batch: int) -> int | None:
    """`liftq plan`'s GPU bytes for a packed folder at this ctx and batch, without the CUDA
    context (not in `max_memory_allocated`); None when `folder` is not a packed model."""
    from liftq_cli.io.embedding_format import parse_embeddings
    from liftq_cli.io.packed_format import parse_quantization_config
    from liftq_cli.plan.architectures import from_hf_config
    from liftq_cli.plan.memory import MemorySettings, model_breakdown

    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "liftquant":
        return None
    layers = parse_quantization_config(quant, str(path))
    layout = parse_embeddings(quant, str(path))
    arch = from_hf_config(config, str(folder), str(folder))

    # (layer, kind) -> config, whatever module the kind sits in (self_attn, mlp, linear_attn);
    # a kind the plan models but the file lacks takes the file's most common config
    by_kind = {
        (int(name.split(".")[2]), name.rpartition(".")[2]): cfg for name, cfg in layers.items()
    }
    common = Counter(layers.values()).most_common(1)[0][0]

    def config_for(spec):
        return by_kind.get((spec.layer, spec.kind), common)

    settings = MemorySettings(ctx=ctx, batch=batch, embed=layout.embed, lm_head=layout.lm_head)
    breakdown = model_breakdown(arch, config_for, settings)
    return breakdown.total - breakdown.parts.get("cuda_context", 0)
