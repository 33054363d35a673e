"""Where a quantize job computes, and at what precision.

Precision policy (the same on every device): weights, activations and trained parameters are
float32; Gram matrices, the whitened Hessian, Cholesky factors and LDLQ error feedback are
float64 (they lose the small eigen-directions in float32). On CUDA, TF32 is allowed for the
float32 matmuls (whitening's proxy error, forwards, correction) unless the job says
`--no-tf32`; float64 work is never TF32.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from liftq_cli.errors import BadInputError


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The torch device for `--device` (auto, cpu, cuda, cuda:N); under torchrun, auto and
    cuda mean this rank's GPU (LOCAL_RANK)."""
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        if not available:
            return torch.device("cpu")
        spec = "cuda"
    if not available:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise BadInputError(
            f"--device {spec}: no CUDA device is visible (torch {torch.__version__} is {build}):"
            f" use --device cpu, or install a CUDA build of torch on a GPU machine"
        )
    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if spec != "cuda" and local_world > 1:
        raise BadInputError(
            f"--device {spec} with {local_world} processes on this node would put them all on "
            f"one GPU: pass --device cuda (process r uses cuda:r) and pick the GPUs with "
            f"CUDA_VISIBLE_DEVICES"
        )
    index = local_rank if spec == "cuda" else int(spec.partition(":")[2])
    if index >= count:
        raise BadInputError(
            f"--device {spec}: this machine has {count} CUDA device(s) (0 to {count - 1}) but "
            f"device {index} was asked for: pick one that exists or start fewer processes"
        )
    return torch.device("cuda", index)


@contextlib.contextmanager
def precision(device: torch.device, tf32: bool) -> Iterator[None]:
    """Apply the precision policy for the duration of a job (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def stream_home(device: torch.device, stream_bytes: int, reserve_bytes: int) -> torch.device:
    """Where the calibration streams live: on the GPU when both fit in half of what is free
    after `reserve_bytes` (the block's own peak), else in host memory (pinned, so batches copy
    to the GPU asynchronously). On CPU, the CPU."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 2 * stream_bytes <= (free - reserve_bytes) / 2 else torch.device("cpu")


def to_home(tensor: torch.Tensor, home: torch.device, compute: torch.device) -> torch.Tensor:
    """`tensor` moved to its home; host tensors of a CUDA job are pinned."""
    if home.type == "cpu" and compute.type == "cuda":
        return tensor.to("cpu").pin_memory()
    return tensor.to(home)
