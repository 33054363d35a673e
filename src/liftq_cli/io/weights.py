"""Memory-mapped access to a Hugging Face folder's safetensors weights, one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from liftq_cli.errors import BadInputError


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
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def get(self, name: str) -> torch.Tensor:
        path = self._files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]

    def fingerprint(self) -> dict[str, int]:
        """Sizes of the weight files: a cheap identity for resume checks."""
        return {p.name: p.stat().st_size for p in sorted(set(self._files.values()))}
