"""Write a safetensors file one tensor at a time, so peak memory is one tensor, not the file.

`safetensors.torch.save_file` needs every tensor in memory at once. The format itself is
simple (an 8-byte little-endian header length, a JSON header of dtypes, shapes and byte
offsets padded to 8 bytes, then the raw little-endian data in header order), so when the
shapes are known up front the header can be written first and each tensor produced, written
and dropped in turn. Files written here load with `safetensors.safe_open` and `load_file`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor that a producer will hand over later."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and JSON header for `specs` laid out in the given order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_streaming(
    path: Path,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write `specs` to `path`, calling `produce(spec)` once per tensor, in order.

    Each produced tensor must match its spec's dtype and shape exactly (a mismatch would make
    the header lie, so it raises ValueError). Returns the file size in bytes.
    """
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in a safetensors file")
    path = Path(path)
    try:
        with open(path, "wb") as handle:
            handle.write(header_bytes(specs, metadata))
            for spec in specs:
                tensor = produce(spec)
                if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise ValueError(
                        f"tensor {spec.name}: produced {tensor.dtype} {tuple(tensor.shape)}, "
                        f"header says {spec.dtype} {spec.shape}"
                    )
                data = tensor.detach().cpu().contiguous().reshape(-1)
                if data.numel():
                    handle.write(data.view(torch.uint8).numpy().tobytes())
                del tensor, data  # one tensor in memory at a time, also while producing the next
            return handle.tell()
    except BaseException:
        path.unlink(missing_ok=True)  # a file whose header lies must not survive
        raise
