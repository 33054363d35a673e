"""`write_streaming`: files safetensors reads back bit for bit, an exact header, lazy producers."""

from __future__ import annotations

import json
import struct
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from liftq_cli.io.safetensors_stream import (
    DTYPE_NAMES,
    DTYPES_BY_NAME,
    TensorSpec,
    header_bytes,
    write_streaming,
)


def _tensors() -> dict[str, torch.Tensor]:
    """Every supported dtype, odd shapes, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    floats = torch.randn(3, 5, 7, generator=g)
    ints = torch.randint(-100, 100, (13,), generator=g)
    return {
        "f32": floats,
        "f64": floats[0].double(),
        "f16": floats[1].half(),
        "bf16": floats[2].bfloat16(),
        "i64": ints * 10**12,
        "i32": ints.int().view(13, 1),
        "i16": ints.short(),
        "i8": ints.to(torch.int8),
        "u8": (ints + 100).to(torch.uint8),
        "bool": ints > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
        "transposed": floats[0].T,  # not contiguous: written in its logical order
    }


def _specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def test_dtype_tables_are_inverse_and_cover_the_safetensors_names():
    assert {DTYPES_BY_NAME[name] for name in DTYPE_NAMES.values()} == set(DTYPE_NAMES)
    assert set(DTYPE_NAMES.values()) == {
        "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL",
    }  # fmt: skip


def test_written_file_loads_back_bit_for_bit(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    size = write_streaming(path, _specs(tensors), lambda spec: tensors[spec.name])
    assert size == path.stat().st_size
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


def test_header_offsets_and_metadata_are_exact(tmp_path):
    tensors = _tensors()
    specs = _specs(tensors)
    path = tmp_path / "x.safetensors"
    metadata = {"format": "pt", "liftq_format": "1"}
    size = write_streaming(path, specs, lambda spec: tensors[spec.name], metadata)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0  # the data starts 8-byte aligned
    assert raw[: 8 + length] == header_bytes(specs, metadata)
    header = json.loads(raw[8 : 8 + length])
    assert header.pop("__metadata__") == metadata
    assert list(header) == [spec.name for spec in specs]  # file order = spec order
    offset = 0
    data = raw[8 + length :]
    for spec in specs:
        entry = header[spec.name]
        assert entry["dtype"] == DTYPE_NAMES[spec.dtype]
        assert entry["shape"] == list(spec.shape)
        assert entry["data_offsets"] == [offset, offset + spec.nbytes]
        chunk = data[offset : offset + spec.nbytes]
        expected = tensors[spec.name].contiguous().reshape(-1).view(torch.uint8)
        assert chunk == expected.numpy().tobytes(), spec.name
        offset += spec.nbytes
    assert size == 8 + length + offset == len(raw)
    with safe_open(path, framework="pt") as handle:
        assert handle.metadata() == metadata


def test_header_without_metadata_has_no_metadata_entry():
    blob = header_bytes([TensorSpec("a", torch.float16, (3,))])
    header = json.loads(blob[8:])
    assert header == {"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]}}
    assert struct.unpack("<Q", blob[:8])[0] == len(blob) - 8


def test_spec_nbytes():
    assert TensorSpec("a", torch.bfloat16, (3, 5)).nbytes == 30
    assert TensorSpec("a", torch.int64, ()).nbytes == 8
    assert TensorSpec("a", torch.bool, (0, 4)).nbytes == 0


def test_producer_is_called_once_per_spec_in_order(tmp_path):
    tensors = _tensors()
    calls: list[str] = []

    def produce(spec: TensorSpec) -> torch.Tensor:
        calls.append(spec.name)
        return tensors[spec.name]

    specs = _specs(tensors)[::-1]  # order is the caller's, not sorted
    write_streaming(tmp_path / "x.safetensors", specs, produce)
    assert calls == [spec.name for spec in specs]


def test_earlier_tensors_are_released_while_later_ones_are_produced(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (64,)) for i in range(6)]
    produced: list[weakref.ref] = []

    def produce(spec: TensorSpec) -> torch.Tensor:
        # All but the previous tensor are gone: the writer does not accumulate the file.
        assert all(ref() is None for ref in produced[:-1]), spec.name
        tensor = torch.full((64,), float(len(produced)))
        produced.append(weakref.ref(tensor))
        return tensor

    write_streaming(tmp_path / "x.safetensors", specs, produce)
    assert all(ref() is None for ref in produced)
    assert torch.equal(load_file(tmp_path / "x.safetensors")["t5"], torch.full((64,), 5.0))


def test_the_previous_tensor_is_released_before_the_next_is_produced(tmp_path):
    specs = [TensorSpec(f"t{i}", torch.float32, (64,)) for i in range(3)]
    produced: list[weakref.ref] = []

    def produce(spec: TensorSpec) -> torch.Tensor:
        assert all(ref() is None for ref in produced), spec.name
        tensor = torch.zeros(64)
        produced.append(weakref.ref(tensor))
        return tensor

    write_streaming(tmp_path / "x.safetensors", specs, produce)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (torch.zeros(4, 3), r"produced torch.float32 \(4, 3\), header says torch.float32 \(3, 4\)"),
        (torch.zeros(3, 4, dtype=torch.float16), r"produced torch.float16 \(3, 4\)"),
        (torch.zeros(12), r"produced torch.float32 \(12,\)"),
    ],
)
def test_a_producer_that_breaks_its_spec_is_refused(tmp_path, bad, said):
    specs = [TensorSpec("ok", torch.int8, (2,)), TensorSpec("w", torch.float32, (3, 4))]
    produce = {"ok": torch.ones(2, dtype=torch.int8), "w": bad}
    with pytest.raises(ValueError, match=f"^tensor w: {said}"):
        write_streaming(tmp_path / "x.safetensors", specs, lambda spec: produce[spec.name])


def test_a_refused_producer_leaves_no_file(tmp_path):
    specs = [TensorSpec("w", torch.float32, (3, 4))]
    with pytest.raises(ValueError):
        write_streaming(tmp_path / "x.safetensors", specs, lambda spec: torch.zeros(4, 3))
    assert list(tmp_path.iterdir()) == []


def test_duplicate_names_are_refused_before_anything_is_written(tmp_path):
    specs = [TensorSpec("a", torch.float32, (1,)), TensorSpec("a", torch.float32, (2,))]

    def produce(spec: TensorSpec) -> torch.Tensor:
        raise AssertionError("no tensor may be produced")

    with pytest.raises(ValueError, match="duplicate tensor names"):
        write_streaming(tmp_path / "x.safetensors", specs, produce)
    assert list(tmp_path.iterdir()) == []
