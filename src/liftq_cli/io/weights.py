"""Memory-mapped access to a Hugging Face folder's safetensors weights, one tensor at a time."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from liftq_cli.errors import BadInputError

FINGERPRINT_BYTES = 8 << 20  # past the header, into the first tensors' data


class WeightReader:
    """Read named tensors from `model.safetensors` or a sharded index without loading all."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: self.folder / shard for name, shard in weight_map.items()}
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
                raise BadInputError(
                    f"'{index}' is not a safetensors index ({exc}): re-download the model"
                ) from None
            for shard in sorted(set(self._files.values())):
                with self._open(shard):
                    pass  # a missing or corrupt shard fails now, not after hours of work
        elif single.is_file():
            with self._open(single) as handle:
                self._files = dict.fromkeys(handle.keys(), single)
        else:
            raise BadInputError(
                f"model folder '{folder}' has no safetensors weights: convert it to safetensors"
            )

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @staticmethod
    @contextmanager
    def _open(path: Path) -> Iterator[Any]:
        """A safetensors handle; a missing, truncated or corrupt file is a BadInputError."""
        try:
            with safe_open(path, framework="pt") as handle:
                yield handle
        except (OSError, SafetensorError) as exc:
            raise BadInputError(
                f"weights file '{path}' is unreadable or corrupt ({exc}): re-download the model"
            ) from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`; refused when it holds NaN or infinite values."""
        # A fresh handle per read: a long-lived one keeps every page it touched mapped, so the
        # process's resident memory would grow to the whole checkpoint over a run.
        with self._open(self._files[name]) as handle:
            tensor = handle.get_tensor(name)
        return self._finite(name, tensor)

    def _finite(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (stored as `name`, or a slice of it), refused when not finite."""
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise BadInputError(
                f"weight '{name}' in '{self._files[name]}' holds NaN or infinite values: the "
                f"checkpoint is broken; re-download or re-export it"
            )
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a stored tensor, read from the header (no data is loaded)."""
        with self._open(self._files[name]) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of a stored tensor, read from the header (no data is loaded)."""
        from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME

        with self._open(self._files[name]) as handle:
            return DTYPES_BY_NAME[handle.get_slice(name).get_dtype()]

    def fingerprint(self) -> dict[str, str]:
        """A cheap identity of the weight files for resume checks: each file's size and a hash
        of its first FINGERPRINT_BYTES. Sizes alone would match two fine-tunes of one base
        model (same shapes, same dtypes); their first tensors' bytes differ."""
        result = {}
        for path in sorted(set(self._files.values())):
            with path.open("rb") as handle:
                digest = hashlib.sha256(handle.read(FINGERPRINT_BYTES)).hexdigest()[:16]
            result[path.name] = f"{path.stat().st_size}:{digest}"
        return result
