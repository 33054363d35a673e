"""The block stage: stream decoder blocks, whiten, encode, correct, resume.

Calibration tokens are embedded once; then, one decoder block at a time, the block's weights
are read from the (memory-mapped) safetensors files into a block built on the meta device,
`quantize_block` whitens and lattice-encodes its linears and corrects the block against its
full-precision output, and the results are saved to the work directory before the next block
loads. Peak memory is therefore one block plus the calibration activations, whatever the
layer count. Two activation streams move forward: full-precision outputs (the targets) and
the quantised-so-far outputs (the inputs, with `sequential`; without, blocks see
full-precision inputs and are independent).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block
from liftq_cli.quant.encode import quantize_linear
from liftq_cli.quant.events import BlockDone, BlockReport, Progress
from liftq_cli.quant.ldlq import Encoder
from liftq_cli.quant.whitening import fit_whitening
from liftq_cli.quantize_job import QuantizeSettings

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
JOB_VERSION = 1
ConfigFor = Callable[[int, str], LatticeConfig]
Matrices = Callable[[LatticeConfig], torch.Tensor]
RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def build_skeleton(folder: Path):
    """The model on the meta device (no memory), with SDPA causal attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in SUPPORTED:
        raise BadInputError(
            f"architecture '{config.model_type}' is not supported by liftq quantize: "
            f"supported are {', '.join(SUPPORTED)}"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return config, model


def linear_kinds(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a decoder block, keyed by its dotted name (self_attn.q_proj, ...)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def load_block(block: nn.Module, reader: WeightReader, prefix: str) -> None:
    block.to_empty(device="cpu")
    for name, tensor in list(block.named_parameters()) + list(block.named_buffers()):
        key = f"{prefix}{name}"
        if key in reader:
            with torch.no_grad():
                tensor.copy_(reader.get(key).float())
        elif isinstance(tensor, nn.Parameter):
            raise BadInputError(f"checkpoint lacks weight '{key}': the folder is incomplete")


def collect_stats(
    block: nn.Module, run: RunBlock, inputs: torch.Tensor, batch: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Gram matrix X^T X and mean |x| of every linear's input over the calibration inputs."""
    linears = linear_kinds(block)
    stats = {name: [0.0, 0.0, 0] for name in linears}
    hooks = []
    for name, module in linears.items():

        def hook(_m, args, _out, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            entry = stats[name]
            entry[0] = entry[0] + x.T @ x
            entry[1] = entry[1] + x.abs().sum(0)
            entry[2] += x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch):
            run(block, inputs[start : start + batch])
    for handle in hooks:
        handle.remove()
    return {k: ((g / n).float(), (a / n).float()) for k, (g, a, n) in stats.items()}


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _forward(block, hidden, position_embeddings, batch: int) -> torch.Tensor:
    outs = []
    for start in range(0, hidden.shape[0], batch):
        out = block(hidden[start : start + batch], position_embeddings=position_embeddings)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return torch.cat(outs)


def quantize_block(
    block: nn.Module,
    layer: int,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    run: RunBlock,
    config_for: ConfigFor,
    matrices: Matrices,
    encode: Encoder,
    settings: QuantizeSettings,
) -> tuple[dict[str, tuple[LatticeConfig, dict[str, torch.Tensor]]], BlockReport]:
    """Whiten, encode and correct every linear of one loaded block, in place.

    inputs/targets: float32 [n, seq, hidden], the block's inputs and full-precision outputs.
    Afterwards the block computes with its quantized linears. Returns {dotted name: (config,
    state)} for the work dir and the block's report.
    """
    began = time.perf_counter()
    stats = collect_stats(block, run, inputs, settings.correction.batch)
    proxy = []
    timings = {"whiten": 0.0, "encode": 0.0}
    for index, (name, linear) in enumerate(linear_kinds(block).items()):
        cfg = config_for(layer, name.rpartition(".")[2])
        gram, act = stats[name]
        tick = time.perf_counter()
        wh, err = fit_whitening(
            linear.weight.detach(),
            gram,
            act,
            cfg.bits,
            steps=settings.whiten_steps,
            seed=settings.seed * 1000 + layer * 16 + index,
            # Error feedback already favours the high-energy input channels; on
            # SmolLM2 the AWQ exponent then adds error (bench/ldlq.py).
            alphas=(0.0,) if settings.ldlq else (0.0, 0.25, 0.5, 0.75),
        )
        proxy.append(err)
        timings["whiten"] += time.perf_counter() - tick
        tick = time.perf_counter()
        quant = quantize_linear(
            linear.weight.detach(),
            wh,
            cfg,
            matrices(cfg),
            encode,
            gram=gram if settings.ldlq else None,
        )
        timings["encode"] += time.perf_counter() - tick
        bias = None if linear.bias is None else linear.bias.detach()
        _set_module(block, name, CorrectableLinear(quant, bias, settings.correction.latent_init))
    correction = replace(settings.correction, seed=settings.seed * 1000 + layer)
    tick = time.perf_counter()
    result = correct_block(block, inputs, targets, run, correction)
    seconds_correct = time.perf_counter() - tick
    linears = {}
    for name, module in block.named_modules():
        if isinstance(module, CorrectableLinear):
            exported = module.export()
            linears[name] = (exported.cfg, exported.state())
    report = BlockReport(
        layer,
        sum(proxy) / len(proxy),
        result.mse_before,
        result.mse_after,
        result.flipped,
        time.perf_counter() - began,
        timings["whiten"],
        timings["encode"],
        seconds_correct,
    )
    return linears, report


def _flush_denormal(fn: Callable) -> Callable:
    """Run `fn` with subnormal floats flushed to zero: small gradients and Cholesky terms go
    subnormal, and on x86 those run ~10x slower."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        torch.set_flush_denormal(True)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return wrapper


@_flush_denormal
def quantize_blocks(
    folder: Path,
    config_for: ConfigFor,
    calib_ids: torch.Tensor,
    work: WorkDir,
    matrices: Matrices,
    encode: Encoder,
    settings: QuantizeSettings,
    job_settings: dict,
    progress: Progress | None = None,
) -> list[BlockReport]:
    """Quantise every decoder block of the model in `folder`; results land in `work`.

    calib_ids: int64 [nsamples, seqlen]; job_settings: what else identifies the job (model,
    calibration, ...) for the work dir's fingerprint. Returns one report per block (resumed
    ones included).
    """
    config, skeleton = build_skeleton(folder)
    reader = WeightReader(folder)
    work.open_job(
        dict(
            job_settings,
            options=settings.block_options(),
            weights=reader.fingerprint(),
            job_version=JOB_VERSION,
        )
    )
    backbone = skeleton.model
    rotary = type(backbone.rotary_emb)(config=config)
    seqlen = calib_ids.shape[1]
    with torch.no_grad():
        probe = torch.zeros(1, seqlen, config.hidden_size)
        position_embeddings = rotary(probe, torch.arange(seqlen).unsqueeze(0))
    batch = settings.correction.batch

    def run(block, hidden):
        return _forward(block, hidden, position_embeddings, batch)

    start_layer = work.done()
    if start_layer == 0:
        embed = reader.get("model.embed_tokens.weight").float()
        hidden = nn.functional.embedding(calib_ids, embed)
        if config.model_type.startswith("gemma"):
            hidden = hidden * torch.tensor(config.hidden_size**0.5, dtype=hidden.dtype)
        fp_stream = hidden
        q_stream = hidden.clone() if settings.sequential else hidden
        del embed
    else:
        fp_stream, q_stream = work.load_streams()
    reports: list[BlockReport] = []
    for layer in range(config.num_hidden_layers):
        if layer < start_layer:
            reports.append(BlockReport(**work.block_report(layer)))
            continue
        block = backbone.layers[layer]
        load_block(block, reader, f"model.layers.{layer}.")
        block.eval()
        with torch.no_grad():
            targets = run(block, fp_stream)
        inputs = q_stream if settings.sequential else fp_stream
        linears, report = quantize_block(
            block, layer, inputs, targets, run, config_for, matrices, encode, settings
        )
        with torch.no_grad():
            next_q = run(block, inputs) if settings.sequential else targets
        work.save_block(layer, linears, asdict(report))
        fp_stream, q_stream = targets, next_q
        work.save_streams(layer + 1, fp_stream, q_stream)
        reports.append(report)
        block.to("meta")
        del block, linears, targets, inputs
        _release_memory()
        if progress is not None:
            progress(BlockDone(report, config.num_hidden_layers))
    return reports


def _release_memory() -> None:
    """Hand a finished block's memory back to the OS. Without this the resident set grows by
    about four times a block's weights per block (autograd reference cycles, and glibc
    keeping freed chunks in per-thread arenas), so peak memory would scale with depth."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): no trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
