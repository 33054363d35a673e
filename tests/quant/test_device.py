"""Where a quantize job computes (quant/device.py): `--device` parsing and refusals, and no
tensor of the block stage is created on the default device (the CPU), which on a GPU job
would be a device mismatch or a silent CPU fallback."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from tests.quant.tiny_job import make_model, run_job
from torch.overrides import TorchFunctionMode

from liftq_cli.errors import BadInputError
from liftq_cli.quant.device import precision, resolve_device, stream_home, to_home
from liftq_cli.quantize_job import _device

SRC = str(Path(__file__).resolve().parents[2] / "src" / "liftq_cli")
FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.eye, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.randperm, torch.tensor, torch.linspace,
}  # fmt: skip


class DefaultDeviceFactories(TorchFunctionMode):
    """Record every liftq_cli line that creates a tensor without naming its device."""

    def __init__(self):
        super().__init__()
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            caller = next(
                f for f in reversed(traceback.extract_stack()[:-1]) if f.filename != __file__
            )
            if caller.filename.startswith(SRC):  # liftq's own call, not a library's
                self.sites.add(f"{Path(caller.filename).name}:{caller.lineno} {caller.line}")
        return func(*args, **kwargs)


def test_the_block_stage_creates_no_tensor_on_the_default_device(tmp_path):
    make_model(tmp_path / "fp", 2)
    with DefaultDeviceFactories() as mode:
        run_job(tmp_path / "fp", tmp_path / "work", tmp_path / "out", 2)
    assert not mode.sites, "\n".join(sorted(mode.sites))


def test_device_spec_is_validated_and_a_missing_gpu_is_one_line(tmp_path, monkeypatch):
    for bad in ("gpu", "cuda:x", "cuda:-1", "", "CPU"):
        with pytest.raises(BadInputError, match="--device"):
            _device(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(BadInputError, match="no CUDA device is visible.*--device cpu"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(BadInputError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this node
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(BadInputError, match="all on one GPU.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:1", local_rank=1)


def test_streams_stay_home_on_cpu_and_precision_is_a_no_op_there():
    x = torch.randn(3, 4)
    assert stream_home(torch.device("cpu"), 10**12, 0) == torch.device("cpu")
    assert to_home(x, torch.device("cpu"), torch.device("cpu")) is x
    before = torch.backends.cuda.matmul.allow_tf32
    with precision(torch.device("cpu"), tf32=False):
        assert torch.backends.cuda.matmul.allow_tf32 == before


def test_precision_sets_and_restores_tf32_on_cuda():
    saved = torch.backends.cuda.matmul.allow_tf32
    for tf32 in (True, False):
        with precision(torch.device("cuda", 0), tf32):
            assert torch.backends.cuda.matmul.allow_tf32 is tf32
            assert torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cuda.matmul.allow_tf32 == saved
