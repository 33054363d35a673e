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
from liftq_cli.io.model_weights import model_weights
from liftq_cli.io.weights import WeightReader
from liftq_cli.io.workdir import WorkDir
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.block_correction import CorrectableLinear, correct_block
from liftq_cli.quant.block_encode import encode_block
from liftq_cli.quant.decoder import (
    LAYERS,
    LayerCall,
    build_skeleton,
    embed,
    find_layers,
    layer_calls,
    load_backbone,
    release_backbone,
)
from liftq_cli.quant.device import stream_home, to_home
from liftq_cli.quant.events import BlockDone, BlockReport, Progress
from liftq_cli.quant.exchange import gram_stats, share_correction
from liftq_cli.quant.experts import expert_layouts
from liftq_cli.quant.ldlq import Encoder
from liftq_cli.quant.parallel import SOLO, Ranks, Team
from liftq_cli.quantize_job import QuantizeSettings

JOB_VERSION = 1
ConfigFor = Callable[[int, str], LatticeConfig]
Matrices = Callable[[LatticeConfig], torch.Tensor]
RunBlock = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def load_block(
    block: nn.Module, reader: WeightReader, prefix: str, device: torch.device | str = "cpu"
) -> None:
    """Materialise a meta-device block on `device` with its weights (float32)."""
    block.to_empty(device=device)
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
    """Gram matrix X^T X and mean |x| (float32, on the inputs' compute device) of every
    linear's input over the calibration inputs; linears reading one tensor share one
    fp64 accumulation, and batches are summed in quant/stats.py's fixed tree."""
    team = Team(SOLO, batch, inputs.shape[0])
    return gram_stats(block, run, inputs, team, {})[0]


def _forward(
    block, hidden, call: LayerCall, batch: int, device: torch.device | None = None
) -> torch.Tensor:
    """The block's output for hidden [n, seq, h], `batch` windows at a time on `device` (the
    block's; default: hidden's), called as the model calls it (`call`), returned where
    `hidden` lives (GPU or pinned host)."""
    device = hidden.device if device is None else device
    outs = []
    for start in range(0, hidden.shape[0], batch):
        x = hidden[start : start + batch].to(device, non_blocking=True)
        out = block(x, *call.args, **call.kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).to(hidden.device))
    return torch.cat(outs)


def block_runner(call: LayerCall, batch: int, device: torch.device | None = None) -> RunBlock:
    """run(block, hidden): one block's forward over windows, as the model calls it."""

    def run(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _forward(block, hidden, call, batch, device)

    return run


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
    team: Team | None = None,
    reference_inputs: torch.Tensor | None = None,
) -> tuple[dict[str, tuple[LatticeConfig, dict[str, torch.Tensor]]], BlockReport]:
    """Whiten, encode and correct every linear of one loaded block, in place.

    inputs/targets: float32 [n, seq, hidden], the block's inputs and full-precision outputs
    (with a team of several ranks: full on the root, this rank's windows elsewhere);
    reference_inputs: the full-precision model's inputs to the block, laid out as `inputs`
    (None: `inputs` are those). Afterwards the block computes with its quantized linears.
    Returns {dotted name: (config, state)} for the work dir and the block's report.

    Encoding is quant/block_encode.py (stage by stage, toward the full-precision outputs).
    With several ranks each linear is whitened and encoded by one owner and its state
    broadcast; correction runs on the root over all windows (so its gradients sum exactly as
    one process's do) and the trained parameters are broadcast, so every rank ends with the
    same block.
    """
    began = time.perf_counter()
    team = team or Team(SOLO, settings.correction.batch, inputs.shape[0])
    ranks = team.ranks
    encoded = encode_block(
        block, layer, inputs, run, config_for, matrices, encode, settings, team, reference_inputs
    )
    correction = replace(settings.correction, seed=settings.seed * 1000 + layer)
    tick = time.perf_counter()
    result = None
    if ranks.root:
        result = correct_block(block, inputs, targets, run, correction)
    result = share_correction(ranks, block, result)
    seconds_correct = time.perf_counter() - tick
    linears_out = {}
    for name, module in block.named_modules():
        if isinstance(module, CorrectableLinear):
            exported = module.export()
            linears_out[name] = (exported.cfg, exported.state())
    report = BlockReport(
        layer,
        sum(encoded.proxy) / len(encoded.proxy),
        result.mse_before,
        result.mse_after,
        result.flipped,
        time.perf_counter() - began,
        *max(encoded.spent, key=sum),  # the busiest rank's: what the block waited for
        seconds_correct,
        len(encoded.unrouted),
        result.steps,
        result.heldout_before,
        result.heldout_after,
    )
    return linears_out, report


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
    work: WorkDir | None,
    matrices: Matrices,
    encode: Encoder,
    settings: QuantizeSettings,
    job_settings: dict,
    progress: Progress | None = None,
    device: torch.device | str = "cpu",
    ranks: Ranks = SOLO,
) -> list[BlockReport]:
    """Quantise every decoder block of the model in `folder`; results land in `work`.

    calib_ids: int64 [nsamples, seqlen]; job_settings: what else identifies the job (model,
    calibration, ...) for the work dir's fingerprint. Returns one report per block (resumed
    ones included). device: where every stage computes (quant/device.py); the streams stay
    on it when they fit, else in pinned host memory.

    ranks: the processes of the job (quant/parallel.py). Each runs the forwards and Gram
    sums of its own windows; the root (the only one with a `work` dir) also holds the full
    streams, corrects each block and saves it, so a job resumes with any number of ranks.
    Independent blocks (not `sequential`) are farmed out instead: every rank runs the
    full-precision forwards over all windows and quantizes blocks layer % world == rank
    alone, then sends them to the root.
    """
    device = torch.device(device)
    config, skeleton = build_skeleton(folder)
    reader = model_weights(folder, config.model_type, expert_layouts(skeleton))
    farm = not settings.sequential and ranks.world > 1
    team = Team(SOLO if farm else ranks, settings.correction.batch, calib_ids.shape[0])
    whole = ranks.root or farm  # holds every window
    if ranks.root:
        assert work is not None, "the root rank owns the work dir"
        work.open_job(
            dict(
                job_settings,
                options=settings.block_options(),
                weights=reader.fingerprint(),
                job_version=JOB_VERSION,
            )
        )
    layers = find_layers(skeleton, config.num_hidden_layers)
    backbone = load_backbone(skeleton, reader, device)
    seqlen = calib_ids.shape[1]
    calls = layer_calls(backbone, layers, seqlen)
    batch = settings.correction.batch
    held = calib_ids.shape[0] if whole else team.counts[ranks.rank]
    stream_bytes = held * seqlen * config.hidden_size * 4
    # keep room for a block's weights, Grams and correction state (a rough 16 x weights)
    reserve = 16 * 4 * sum(p.numel() for p in layers[0].parameters())
    home = stream_home(device, stream_bytes, reserve)

    start_layer = ranks.broadcast_object(work.done() if ranks.root else None)
    if start_layer == 0:
        ids = calib_ids if whole else calib_ids[team.rows()]
        hidden = embed(backbone, layers, ids, batch)
        fp_stream = to_home(hidden, home, device)
        q_stream = fp_stream.clone() if settings.sequential else fp_stream
        del hidden
    elif farm:  # the full-precision stream, on every rank
        stream = work.load_streams()[0] if ranks.root else None
        shape = (calib_ids.shape[0], seqlen, config.hidden_size)
        fp_stream = q_stream = to_home(
            ranks.broadcast(stream, shape, torch.float32, 0), home, device
        )
    else:
        streams = work.load_streams() if ranks.root else (None, None)
        shape = (seqlen, config.hidden_size)
        held_streams = []
        for stream in streams:  # the root keeps the full streams, the others their rows
            shard = ranks.scatter_rows(stream, team.counts, shape, torch.float32)
            held_streams.append(to_home(stream if ranks.root else shard, home, device))
        fp_stream, q_stream = held_streams
    release_backbone(backbone)  # the blocks need only their calls from here on
    reports: list[BlockReport] = []
    for layer in range(config.num_hidden_layers):
        if layer < start_layer:
            if ranks.root:
                reports.append(BlockReport(**work.block_report(layer)))
            continue
        block = layers[layer]
        load_block(block, reader, f"{LAYERS}.{layer}.", device)
        run = block_runner(calls[layer], batch, device)
        block.eval()
        with torch.no_grad():
            targets = team.gather(run(block, team.local(fp_stream)))
        inputs = q_stream if settings.sequential else fp_stream
        owner = layer % ranks.world if farm else ranks.rank
        linears, report = None, None
        if owner == ranks.rank:
            linears, report = quantize_block(
                block, layer, inputs, targets, run, config_for, matrices, encode, settings, team,
                None if inputs is fp_stream else fp_stream,
            )  # fmt: skip
        if farm and owner != 0:  # the root saves what the owner quantized
            if ranks.rank == owner:
                ranks.send_object((_on_host(linears), report), 0)
            elif ranks.root:
                linears, report = ranks.recv_object(owner)
        with torch.no_grad():
            next_q = team.gather(run(block, team.local(inputs))) if settings.sequential else targets
        fp_stream, q_stream = targets, next_q
        if ranks.root:
            work.save_block(layer, linears, asdict(report))
            work.save_streams(layer + 1, fp_stream, q_stream)
        if report is not None:
            reports.append(report)
        block.to("meta")
        del block, linears, targets, inputs
        _release_memory()
        if progress is not None and report is not None:
            progress(BlockDone(report, config.num_hidden_layers))
    return reports


def _on_host(linears: dict[str, tuple[LatticeConfig, dict[str, torch.Tensor]]]) -> dict:
    return {n: (cfg, {k: v.cpu() for k, v in st.items()}) for n, (cfg, st) in linears.items()}


def _release_memory() -> None:
    """Hand a finished block's memory back to the OS. Without this the resident set grows by
    about four times a block's weights per block (autograd reference cycles, and glibc
    keeping freed chunks in per-thread arenas), so peak memory would scale with depth."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): no trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)
