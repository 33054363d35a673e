"""Memory-mapped access to a Hugging Face folder's safetensors weights, one tensor at a time."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from liftq_cli.errors import BadInputError

FINGERPRINT_BYTES = 8 << 20  # past the header, into the first tensors' data


class WeightReader:
    """Read named tensors from `model.safetensors` or a sharded index without loading all."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as handle:
                self._files = dict.fromkeys(handle.keys(), single)
        else:
            raise BadInputError(
                f"model folder '{folder}' has no safetensors weights: convert it to safetensors"
            )

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        # A fresh handle per read: a long-lived one keeps every page it touched mapped, so the
        # process's resident memory would grow to the whole checkpoint over a run.
        with safe_open(self._files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a stored tensor, read from the header (no data is loaded)."""
        with safe_open(self._files[name], framework="pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of a stored tensor, read from the header (no data is loaded)."""
        from liftq_cli.io.safetensors_stream import DTYPES_BY_NAME

        with safe_open(self._files[name], framework="pt") as handle:
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
