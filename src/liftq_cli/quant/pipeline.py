"""The layerwise quantiser: stream decoder blocks, whiten, encode, correct, resume.

Calibration tokens are embedded once; then, one decoder block at a time, the block's weights
are read from the (memory-mapped) safetensors files into a block built on the meta device,
the block's linears are whitened and lattice-encoded, the block is corrected against its
full-precision output, and the results are saved to the work directory before the next block
loads. Peak memory is therefore one block plus the calibration activations, whatever the
layer count. Two activation streams move forward: full-precision outputs (the targets) and
the quantised-so-far outputs (the inputs, with `sequential=True`; with False, blocks see
full-precision inputs and are independent).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_file
from liftq_cli.io.weights import WeightReader
from liftq_cli.quant.block_correction import CorrectableLinear, CorrectionConfig, correct_block
from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.layerwise import Encoder, QuantizedLinear, quantize_linear
from liftq_cli.quant.whitening import fit_whitening

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
JOB_VERSION = 1
ConfigFor = Callable[[int, str], LatticeConfig]
Progress = Callable[[dict], None]


@dataclass(frozen=True)
class QuantizeOptions:
    seed: int = 0
    whiten_steps: int = 50
    sequential: bool = True
    ldlq: bool = True  # error feedback while encoding (layerwise.ldlq_encode)
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)


@dataclass
class BlockReport:
    layer: int
    proxy_error: float
    mse_before: float
    mse_after: float
    flipped: float
    seconds: float
    seconds_whiten: float = 0.0
    seconds_encode: float = 0.0
    seconds_correct: float = 0.0


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


def job_fingerprint(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class WorkDir:
    """Per-block results and activation streams on disk, so an interrupted job resumes."""

    def __init__(self, path: Path, job: dict):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        job_file = self.path / "job.json"
        if job_file.is_file():
            old = json.loads(job_file.read_text())
            if old.get("fingerprint") != job["fingerprint"]:
                diff = sorted(
                    k for k in job["settings"] if old["settings"].get(k) != job["settings"][k]
                )
                raise BadInputError(
                    f"--work-dir '{path}' holds a job with different settings "
                    f"({', '.join(diff) or 'fingerprint'} changed): use another --work-dir or "
                    f"delete it to start over"
                )
        else:
            with atomic_file(job_file) as tmp:
                tmp.write_text(json.dumps(job, indent=2, sort_keys=True))

    def block_file(self, layer: int) -> Path:
        return self.path / f"block_{layer:04d}.safetensors"

    def done(self) -> int:
        """Number of leading blocks whose results and following streams are complete."""
        state = self.path / "streams.json"
        return json.loads(state.read_text())["next_layer"] if state.is_file() else 0

    def save_block(self, layer: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with atomic_file(self.block_file(layer)) as tmp:
            save_file(tensors, str(tmp), metadata={"report": json.dumps(meta)})

    def save_streams(self, next_layer: int, fp: torch.Tensor, quant: torch.Tensor) -> None:
        with atomic_file(self.path / "streams.safetensors") as tmp:
            save_file({"fp": fp.contiguous(), "quant": quant.contiguous()}, str(tmp))
        with atomic_file(self.path / "streams.json") as tmp:
            tmp.write_text(json.dumps({"next_layer": next_layer}))

    def load_streams(self) -> tuple[torch.Tensor, torch.Tensor]:
        streams = load_file(self.path / "streams.safetensors")
        return streams["fp"], streams["quant"]


def _collect_stats(block, run, inputs: torch.Tensor, batch: int) -> dict[str, tuple]:
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


def quantize_blocks(
    folder: Path,
    config_for: ConfigFor,
    calib_ids: torch.Tensor,
    work_dir: Path,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    encode: Encoder,
    options: QuantizeOptions,
    job_settings: dict,
    progress: Progress | None = None,
) -> list[BlockReport]:
    """Quantise every decoder block of the model in `folder`; results land in `work_dir`.

    calib_ids: int64 [nsamples, seqlen]. Returns one report per block (resumed ones included).
    """
    # Small gradients and Cholesky terms go subnormal; on x86 those run ~10x slower.
    torch.set_flush_denormal(True)
    try:
        return _quantize_blocks(
            folder,
            config_for,
            calib_ids,
            work_dir,
            matrices,
            encode,
            options,
            job_settings,
            progress,
        )
    finally:
        torch.set_flush_denormal(False)


def _quantize_blocks(
    folder: Path,
    config_for: ConfigFor,
    calib_ids: torch.Tensor,
    work_dir: Path,
    matrices: Callable[[LatticeConfig], torch.Tensor],
    encode: Encoder,
    options: QuantizeOptions,
    job_settings: dict,
    progress: Progress | None,
) -> list[BlockReport]:
    config, skeleton = build_skeleton(folder)
    reader = WeightReader(folder)
    settings = dict(
        job_settings, options=asdict(options), weights=reader.fingerprint(), job_version=JOB_VERSION
    )
    work = WorkDir(work_dir, {"fingerprint": job_fingerprint(settings), "settings": settings})
    backbone = skeleton.model
    rotary = type(backbone.rotary_emb)(config=config)
    seqlen = calib_ids.shape[1]
    with torch.no_grad():
        probe = torch.zeros(1, seqlen, config.hidden_size)
        position_embeddings = rotary(probe, torch.arange(seqlen).unsqueeze(0))
    batch = options.correction.batch

    def run(block, hidden):
        return _forward(block, hidden, position_embeddings, batch)

    start_layer = work.done()
    if start_layer == 0:
        embed = reader.get("model.embed_tokens.weight").float()
        hidden = nn.functional.embedding(calib_ids, embed)
        if config.model_type.startswith("gemma"):
            hidden = hidden * torch.tensor(config.hidden_size**0.5, dtype=hidden.dtype)
        fp_stream, q_stream = hidden, hidden.clone()
        del embed
    else:
        fp_stream, q_stream = work.load_streams()
    reports: list[BlockReport] = []
    for layer in range(config.num_hidden_layers):
        if layer < start_layer:
            meta = load_file_meta(work.block_file(layer))
            reports.append(BlockReport(**meta))
            continue
        began = time.perf_counter()
        block = backbone.layers[layer]
        load_block(block, reader, f"model.layers.{layer}.")
        block.eval()
        with torch.no_grad():
            targets = run(block, fp_stream)
        inputs = q_stream if options.sequential else fp_stream
        stats = _collect_stats(block, run, inputs, batch)
        tensors: dict[str, torch.Tensor] = {}
        proxy = []
        timings = {"whiten": 0.0, "encode": 0.0}
        for index, (name, linear) in enumerate(linear_kinds(block).items()):
            kind = name.rpartition(".")[2]
            cfg = config_for(layer, kind)
            gram, act = stats[name]
            tick = time.perf_counter()
            wh, err = fit_whitening(
                linear.weight.detach(),
                gram,
                act,
                cfg.bits,
                steps=options.whiten_steps,
                seed=options.seed * 1000 + layer * 16 + index,
                # Error feedback already favours the high-energy input channels; on
                # SmolLM2 the AWQ exponent then adds error (bench/ldlq.py).
                alphas=(0.0,) if options.ldlq else (0.0, 0.25, 0.5, 0.75),
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
                gram=gram if options.ldlq else None,
            )
            timings["encode"] += time.perf_counter() - tick
            bias = None if linear.bias is None else linear.bias.detach()
            _set_module(block, name, CorrectableLinear(quant, bias, options.correction.latent_init))
        correction = CorrectionConfig(
            **{**asdict(options.correction), "seed": options.seed * 1000 + layer}
        )
        tick = time.perf_counter()
        result = correct_block(block, inputs, targets, run, correction)
        seconds_correct = time.perf_counter() - tick
        for name, module in linear_kinds_correctable(block).items():
            exported = module.export()
            tensors.update(exported.state(f"{name}."))
            tensors[f"{name}.lattice"] = torch.tensor([exported.cfg.D, exported.cfg.d])
        with torch.no_grad():
            next_q = run(block, inputs) if options.sequential else targets
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
        work.save_block(layer, tensors, asdict(report))
        fp_stream, q_stream = targets, next_q
        work.save_streams(layer + 1, fp_stream, q_stream)
        reports.append(report)
        block.to("meta")
        del block, stats, tensors, targets, inputs, result
        _release_memory()
        if progress is not None:
            progress({"event": "block", **asdict(report), "layers": config.num_hidden_layers})
    return reports


def _release_memory() -> None:
    """Hand a finished block's memory back to the OS. Without this the resident set grows by
    about four times a block's weights per block (autograd reference cycles, and glibc
    keeping freed chunks in per-thread arenas), so peak memory would scale with depth."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl): no trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def linear_kinds_correctable(block: nn.Module) -> dict[str, CorrectableLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, CorrectableLinear)}


def load_file_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return json.loads(handle.metadata()["report"])


def load_block_quant(
    work_dir: Path, layer: int, matrices: Callable[[LatticeConfig], torch.Tensor]
) -> dict[str, QuantizedLinear]:
    """The quantised linears of one finished block, keyed by dotted name."""
    state = load_file(Path(work_dir) / f"block_{layer:04d}.safetensors")
    result = {}
    for key in state:
        if key.endswith(".lattice"):
            name = key[: -len(".lattice")]
            D, d = (int(v) for v in state[key].tolist())
            cfg = LatticeConfig(D, d)
            result[name] = QuantizedLinear.from_state(state, f"{name}.", cfg, matrices(cfg))
    return result
