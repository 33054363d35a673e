"""A checkpoint's tensors under the names of the model liftq quantizes (experts unfused).

Mixture-of-experts checkpoints store experts in one of two ways: per expert under legacy
names (Mixtral `block_sparse_moe.experts.3.w1.weight`, Qwen3-MoE
`mlp.experts.3.gate_proj.weight`) or fused as 3-D tensors (gpt-oss, Llama 4
`mlp.experts.gate_up_proj` [E, H, 2I]). liftq's model has one linear per expert matrix
(quant/experts.py), so `ModelWeights` shows the checkpoint under that model's names:

- renames come from transformers' own conversion mapping for the model type (its
  `WeightRenaming` rules, e.g. `.block_sparse_moe.` -> `.mlp.`), and the per-expert leaf
  names from its expert-merging rules (`w1` is what it merges into the gate, `w3` the up);
- a fused tensor is read one expert's slice at a time (a safetensors slice: no need to
  hold all experts) and split into gate, up and down by the module's layout.

Only models with fused experts get this view; every other model reads its checkpoint as
it is (`WeightReader`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from liftq_cli.io.expert_layout import ExpertLayout, fused_names, split_expert
from liftq_cli.io.weights import WeightReader

Source = tuple[str, int | None, str | None]  # checkpoint key, expert index, fused part


def _rules(model_type: str) -> list[tuple[str, str]]:
    """(pattern, replacement) regex pairs taking checkpoint keys to the model's names."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    rules = []
    for rule in get_checkpoint_conversion_mapping(model_type) or []:
        sources, targets = list(rule.source_patterns), list(rule.target_patterns)
        if type(rule).__name__ == "WeightRenaming":
            rules.append((sources[0], targets[0]))
            continue
        target = targets[0].rpartition(".")[2]
        leaves = {"gate_up_proj": ["gate_proj", "up_proj"]}.get(target, [target])
        for source, leaf in zip(sources, leaves, strict=False):  # `.experts.*.w1.weight`
            stem, star, old = source.partition("*.")
            if star and old.endswith(".weight"):
                pattern = rf"\.experts\.(\d+)\.{re.escape(old)}$"
                rules.append((pattern, rf".experts.\1.{leaf}.weight"))
    return rules


class ModelWeights(WeightReader):
    """The checkpoint in `folder` under the unfused model's tensor names."""

    def __init__(self, folder: Path, model_type: str, layouts: dict[str, ExpertLayout]):
        super().__init__(folder)
        rules = _rules(model_type)
        self._sources: dict[str, Source] = {}
        self._layouts: dict[str, tuple[ExpertLayout, str]] = {}
        for key in super().names():
            name = key
            for pattern, replacement in rules:
                name = re.sub(pattern, replacement, name)
            self._sources[name] = (key, None, None)
        for path, layout in layouts.items():
            fused = {n: f"{path}.{n}" for n in fused_names(layout)}
            if not all(name in self._sources for name in fused.values()):
                continue  # stored per expert: the renames did it
            for part_name, name in fused.items():
                key = self._sources.pop(name)[0]
                self._layouts[key] = (layout, part_name)
                locals_ = list(split_expert(_stub(layout, part_name), layout))
                for e in range(layout.experts):
                    for local in locals_:
                        self._sources[f"{path}.{e}.{local}"] = (key, e, local)

    def names(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def get(self, name: str) -> torch.Tensor:
        key, expert, local = self._sources[name]
        if expert is None:
            return super().get(key)
        layout, part_name = self._layouts[key]
        with self._open(self._files[key]) as handle:
            piece = self._finite(key, handle.get_slice(key)[expert])
        return split_expert({part_name: piece}, layout)[local]

    def shape(self, name: str) -> tuple[int, ...]:
        key, expert, local = self._sources[name]
        if expert is None:
            return super().shape(key)
        layout, part_name = self._layouts[key]
        return tuple(split_expert(_stub(layout, part_name), layout)[local].shape)

    def dtype(self, name: str) -> torch.dtype:
        return super().dtype(self._sources[name][0])


def _stub(layout: ExpertLayout, part_name: str) -> dict[str, torch.Tensor]:
    """A meta tensor shaped like one expert's slice of fused tensor `part_name`."""
    width = 2 * layout.intermediate if layout.gate else layout.intermediate
    out, inp = {"down_proj": (layout.hidden, layout.intermediate)}.get(
        part_name.removesuffix("_bias"), (width, layout.hidden)
    )
    matrix = (inp, out) if layout.transposed else (out, inp)
    shape = (out,) if part_name.endswith("_bias") else matrix
    return {part_name: torch.empty(shape, device="meta")}


def model_weights(folder: Path, model_type: str, layouts: dict[str, ExpertLayout]) -> WeightReader:
    """The reader a block stage uses: `ModelWeights` for a model with experts, else plain."""
    if not layouts:
        return WeightReader(folder)
    return ModelWeights(folder, model_type, layouts)
