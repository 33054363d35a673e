"""Bytes of a `liftq quantize` job: its work dir and output on disk, host RAM, device memory.

With N = nsamples, L = seqlen, h = hidden, W processes, B = correction.batch, S one full
stream N L h 4 bytes (rank 0 holds the full streams: it corrects each block and saves the
streams), S_W one other rank's shard ceil(N/W) L h 4 bytes, hdr = 160 bytes of safetensors
header per tensor, and per matrix (o out, n in, a * b = n, LQ-D/d; c = o ceil(n/d) D code
bits, w = o ceil(c/o / 32) 32-bit words; sums run over every matrix, MoE experts included):

    work dir     sum (4w + 4o + 8n + 4(a^2+b^2) + 16 + 7 hdr) + layers x 4096    block files
                 + 2 x files x N L h 4 + 4 hdr    streams.safetensors (files: 2 with
                                      --sequential, else 1; old and new coexist while the
                                      file is replaced after each block)
                 + [--mixed] 64 per linear + 4096                 sensitivity.json
                 + [fine-tuning] 4 (sum (o + 2n) + norms) + 3 hdr per linear   finetune cache
    output       sum (4w + 4o + 8n + 4(a^2+b^2) + 6 hdr) + (4 d D + hdr) per config   codes
                 + dtype (vocab h (2, or 1 when tied) + norms) + hdr per tensor   unquantized
                 + 32 MB                  config, tokenizer, liftq.json, recipe.yaml
    device peak  4 block params + [streams on the device] live x S      (rank 0; the others
                                                          hold live x S_W)
                 + max(stats:   8 G' (1 + ceil(log2 ceil(ceil(N/W) / B))),
                       encode:  4 G' + max over linears (4n^2 + 40on, [--ldlq] 44n^2 + 8on)
                                + [compensate] 4 G' + 4 P,
                       correct: sum (20c + 16(o + 2n) + 20on) + activations(B);
                                on a GPU the reconstruction is recomputed in backward:
                                sum (16c + 16(o + 2n) + 4on) + max (4c + 16on)
                                + activations(B))
    host RAM     max of the phases that are on:
                 block stage  W (8 N L + 1.5 GB + max(4 vocab h, 4 block params))
                              + live x (S + (W - 1) S_W) on the host, or files x S (the
                              copy rank 0 writes the work dir's streams from) on the device
                              + [no GPU] W x (the device peak less its weights)
                 --mixed      4 params + layers x activations(2) + 1.5 GB   (Fisher pass)
                 fine-tuning  8 params (teacher and student, fp32) + layers x
                              activations(finetune.batch) + 1.5 GB

G = sum n^2 over the distinct inputs (q/k/v share one, gate/up share one): the fp64 Gram
partials of the fixed reduction tree, then the fp32 Grams. G' = the largest stage's G with
true_sequential (one stage's statistics live at a time, quant/stages.py), else G; with
compensate plus sum o n over that stage's linears (routed experts excepted): each one's
cross sum y_f^T x beside the Grams, fp64. compensate also keeps the original weights of
the encoded linears (4 P, P the block's linear parameters) until the block is encoded.
correct: per code bit an fp32 latent, its gradient and Adam's two moments (16c), the
scales' (16(o + 2n)), and the reconstruction's autograd tensors (the signs and five o x n
intermediates: 4c + 20on); the statistics are freed before it starts.
live = 4 streams with --sequential (inputs and outputs of both while the next inputs are
computed), else 2; activations(b) = 4 b L (10 h + 3 inter) + 4 b heads L^2. The streams stay
on the device when they fit in half of what the block peak leaves free (`stream_placement`).
Every function here is pure; quant/preflight.py holds them against what the machine has.
"""

from __future__ import annotations

import math

from liftq_cli.plan.architectures import Architecture, layer_linears, other_params, param_count
from liftq_cli.quant.cost_inputs import input_stages
from liftq_cli.quant.costmodel import LinearWork, block_work, state_bytes
from liftq_cli.quantize_job import QuantizeJob, QuantizeSettings

HEADER = 160  # safetensors header bytes per tensor (name, dtype, shape, offsets), an allowance
REPORT = 4096  # a block file's report metadata and header preamble
FILES = 32 * 10**6  # output: config, tokenizer, liftq.json, recipe.yaml
RUNTIME = 1_500_000_000  # host bytes of one process: torch and transformers (~0.33 GB
# resident after import on CPU) and the CUDA context's host side


def _blocks(arch: Architecture, job: QuantizeJob) -> list[list[LinearWork]]:
    """Every block's linears at the job's configs (the search beam plays no part in bytes)."""
    return [
        block_work(arch, layer, job.config_for, lambda _: 0) for layer in range(arch.num_layers)
    ]


def stream_shard(settings: QuantizeSettings, arch: Architecture, world: int = 1) -> int:
    """S_W: one fp32 activation stream [ceil(N/W), L, h] of a rank other than 0, bytes
    (world 1: S, the full stream rank 0 holds)."""
    calib = settings.calibration
    return -(-calib.nsamples // world) * calib.seqlen * arch.hidden_size * 4


def live_streams(settings: QuantizeSettings) -> int:
    return 4 if settings.sequential else 2


def activations(arch: Architecture, batch: int, seqlen: int) -> int:
    """Autograd activations of one block for `batch` windows (fp32), attention probabilities
    included (the math attention path keeps them)."""
    inter = arch.intermediate_size
    if arch.is_moe:
        inter = arch.moe_intermediate_size * arch.experts_per_token
        inter += arch.shared_expert_intermediate_size
    per_token = 10 * arch.hidden_size + 3 * inter
    return 4 * batch * seqlen * per_token + 4 * batch * arch.num_heads * seqlen * seqlen


def _block_params(arch: Architecture) -> int:
    linear = sum(s.params for s in layer_linears(arch, 0))
    return linear + (other_params(arch) - arch.hidden_size) // arch.num_layers


def work_dir_bytes(arch: Architecture, job: QuantizeJob) -> dict[str, int]:
    """Disk of the work dir by part: block files, streams, stage caches."""
    settings, blocks = job.settings, _blocks(arch, job)
    per_linear = 16 + 7 * HEADER  # the [D, d] int64 lattice tensor and 7 header entries
    block_files = sum(
        REPORT + sum(state_bytes(x) + x.count * per_linear for x in b) for b in blocks
    )
    files = 2 if settings.sequential else 1
    parts = {
        "blocks": block_files,
        "streams": 2 * files * stream_shard(settings, arch) + 4 * HEADER,
    }
    count = sum(x.count for b in blocks for x in b)
    if settings.mixed:
        parts["sensitivity"] = 64 * count + 4096
    if settings.finetune.steps:
        tuned = sum(x.count * (x.out + 2 * x.inp) for b in blocks for x in b) + other_params(arch)
        parts["finetune"] = 4 * tuned + HEADER * 3 * count
    return parts


def output_bytes(arch: Architecture, job: QuantizeJob, dtype_bytes: int = 2) -> dict[str, int]:
    """Disk of the output folder by part; `dtype_bytes`: the source checkpoint's (bf16: 2)."""
    blocks = _blocks(arch, job)
    codes = sum(state_bytes(x) + x.count * 6 * HEADER for b in blocks for x in b)
    codes += sum(4 * c.d * c.D + HEADER for c in {x.cfg for b in blocks for x in b})
    embed = arch.vocab_size * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    tensors = arch.norms_per_layer * arch.num_layers + 3
    rest = dtype_bytes * (embed + other_params(arch)) + HEADER * tensors
    return {"codes": codes, "unquantized": rest, "files": FILES}


def device_parts(
    arch: Architecture, job: QuantizeJob, world: int = 1, gpu: bool = True
) -> dict[str, int]:
    """Per-rank block peak without the streams, by phase (each at its largest block); `gpu`:
    correction recomputes each weight's reconstruction in backward (block_correction.py)."""
    settings = job.settings
    calib, corr = settings.calibration, settings.correction
    blocks = _blocks(arch, job)
    stage = max(  # G'
        sum(n * n * count for n, count, _ in inputs.values())
        + sum(x.count * x.out * x.inp for x in linears if settings.compensate and x.share == 1.0)
        for inputs, linears in input_stages(blocks[0], settings)
    )
    windows = -(-calib.nsamples // world)
    depth = 1 + math.ceil(math.log2(-(-windows // corr.batch)))  # partials of the Gram tree
    workspace = 0
    for x in blocks[0]:
        o, n = x.out, x.inp
        ldlq = 44 * n * n + 8 * o * n if settings.ldlq else 0
        workspace = max(workspace, 4 * n * n + 40 * o * n, ldlq)
    correct = 0
    for block in blocks:
        state, transient = 0, 0
        for x in block:
            bits = x.out * -(-x.inp // x.cfg.d) * x.cfg.D
            if gpu:
                state += x.count * (16 * bits + 16 * (x.out + 2 * x.inp) + 4 * x.out * x.inp)
                transient = max(transient, 4 * bits + 16 * x.out * x.inp)
            else:
                # + the start and best snapshots of the latents (block_correction._snapshot)
                state += x.count * (24 * bits + 16 * (x.out + 2 * x.inp) + 20 * x.out * x.inp)
        correct = max(correct, state + transient)
    correct += activations(arch, corr.batch, calib.seqlen)  # the Grams are gone by then
    encode = 4 * stage + workspace
    if settings.compensate:  # the cross sums stay fp64, the encoded linears' weights stay
        encode += 4 * stage + 4 * sum(x.count * x.out * x.inp for x in blocks[0])
    return {
        "weights": 4 * _block_params(arch),
        "stats": 8 * stage * depth,
        "encode": encode,
        "correct": correct,
    }


def block_peak(parts: dict[str, int]) -> int:
    """Weights plus the largest phase."""
    return parts["weights"] + max(parts["stats"], parts["encode"], parts["correct"])


def stream_placement(stream_bytes: int, free_device_bytes: int, block_peak_bytes: int) -> str:
    """Where the activation streams live: 'device' when `stream_bytes` (every live stream
    shard of the rank) fit in half of the device memory the block peak leaves free, else
    'host' (pinned host memory, copied to the device a batch at a time)."""
    return "device" if 2 * stream_bytes <= free_device_bytes - block_peak_bytes else "host"


def host_parts(
    arch: Architecture, job: QuantizeJob, world: int, placement: str, on_cpu: bool
) -> dict[str, int]:
    """Host RAM by phase: the block stage, and --mixed / fine-tuning when they are on."""
    settings = job.settings
    calib = settings.calibration
    full, shard = stream_shard(settings, arch), stream_shard(settings, arch, world)
    if placement == "host":
        held = live_streams(settings) * (full + (world - 1) * shard)
    else:  # rank 0's copy for the work dir
        held = live_streams(settings) // 2 * full
    block = world * (8 * calib.nsamples * calib.seqlen + RUNTIME)
    block += world * max(4 * arch.vocab_size * arch.hidden_size, 4 * _block_params(arch))
    block += held
    if on_cpu:  # the block peak is in host RAM (its weights are counted above)
        peak = device_parts(arch, job, world, gpu=False)
        block += world * (block_peak(peak) - peak["weights"])
    parts = {"block stage": block}
    params, seqlen = param_count(arch), calib.seqlen
    if settings.mixed:
        parts["--mixed"] = 4 * params + arch.num_layers * activations(arch, 2, seqlen) + RUNTIME
    if settings.finetune.steps:
        acts = arch.num_layers * activations(arch, settings.finetune.batch, seqlen)
        parts["fine-tuning"] = 8 * params + acts + RUNTIME
    return parts
