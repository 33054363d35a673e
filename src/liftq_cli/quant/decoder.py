"""Where a transformers causal LM keeps its decoder blocks, and how it calls them.

Nothing here knows an architecture by name. The blocks are the `nn.ModuleList` of
`num_hidden_layers` modules the model runs; the block stage calls each with exactly the
arguments the model's own forward passes it (rotary tables, per-layer-type masks, position
ids, ...), recorded once from a one-window probe of the model with every block replaced by
a recorder. So a decoder that transformers runs is quantized without a code change, unless
`refusal` names a reason it cannot be yet: checked from the config alone, before any work.

Recorded arguments come from one window and broadcast over the batch: nothing a block is
called with may depend on the tokens, which is why per-token side inputs are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.io.model_weights import model_weights
from liftq_cli.io.weights import WeightReader
from liftq_cli.quant.experts import expert_layouts, unfuse_experts

LAYERS = "model.layers"  # where every transformers *ForCausalLM keeps its text decoder blocks
_BASE, _, _LIST = LAYERS.rpartition(".")  # the base model ("model") and its block list


@dataclass
class LayerCall:
    """The arguments after the hidden states that the model passes one block."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def refusal(config: Any) -> str | None:
    """Why liftq cannot quantize this decoder yet (a sentence naming the feature), or None."""
    kind = config.model_type
    if getattr(config, "vision_config", None) is not None or hasattr(config, "text_config"):
        return (
            f"'{kind}' is a multimodal checkpoint (a text model with a vision or audio tower): "
            "liftq quantize reads text-only decoders; pass a text-only checkpoint of the model"
        )
    if getattr(config, "hidden_size_per_layer_input", 0):
        return (
            f"'{kind}' feeds every block a per-token side input (per-layer embeddings, "
            f"hidden_size_per_layer_input={config.hidden_size_per_layer_input}), which the "
            "block stage does not stream yet"
        )
    if getattr(config, "num_kv_shared_layers", 0):
        return (
            f"'{kind}' has {config.num_kv_shared_layers} layers that reuse another layer's "
            "keys and values, so its blocks cannot be quantized one at a time"
        )
    return None


def check_supported(folder: Path | None) -> None:
    """Refuse, from the config alone, what the block stage would refuse for the model
    folder (`blocks.build_skeleton`); a preset (folder None) names no checkpoint to check."""
    if folder is not None:
        build_skeleton(folder)


def check_experts(config: Any, layouts: dict) -> None:
    """Refuse a mixture-of-experts model whose experts are not transformers' fused experts
    modules (`runtime.experts.unfuse_experts` found none of them)."""
    from liftq_cli.plan.hf_config import expert_count

    experts = expert_count(config.to_dict()) or getattr(config, "enable_moe_block", 0)
    if experts and not layouts:
        raise BadInputError(
            f"architecture '{config.model_type}' is a mixture-of-experts model whose experts "
            "are not stored as transformers' fused experts (3-D gate_up_proj and down_proj): "
            "liftq quantize cannot calibrate them one by one yet"
        )


def build_skeleton(folder: Path):
    """The model on the meta device (no memory), with SDPA causal attention; a decoder that
    quant/decoder.py cannot handle yet is refused by name, before any weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise BadInputError(
            f"transformers cannot read the config in '{folder}' ({first}): pass a model "
            "folder whose config.json transformers knows"
        ) from None
    reason = refusal(config)
    if reason is not None:
        raise BadInputError(f"architecture {reason}")
    try:
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
            except ValueError as exc:  # no SDPA path (gpt-oss's attention sinks): eager
                if "attention implementation" not in str(exc):
                    raise
                model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise BadInputError(
            f"architecture '{config.model_type}' has no causal language model in transformers "
            f"({first}): liftq quantize reads decoder-only models"
        ) from None
    find_layers(model, config.num_hidden_layers)  # refuses a model without the usual layout
    check_experts(config, unfuse_experts(model, config.hidden_size))
    return config, model


def checkpoint_reader(folder: Path) -> WeightReader:
    """The checkpoint in `folder` under the names of the model the block stage quantizes
    (experts one linear per matrix: io/model_weights.py)."""
    config, skeleton = build_skeleton(folder)
    return model_weights(folder, config.model_type, expert_layouts(skeleton))


def find_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The decoder blocks of `model` (any device, meta included): the `nn.ModuleList` of
    `num_layers` modules at LAYERS, where checkpoints, the packed format and the loaders
    name them (`model.layers.3.`)."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if LAYERS not in found:
        where = f"at '{found[0]}'" if found else "nowhere (no list of num_hidden_layers modules)"
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise BadInputError(
            f"architecture '{kind}' ({type(model).__name__}) keeps its decoder blocks {where}, "
            f"not at '{LAYERS}' where liftq's formats and loaders expect them: not supported yet"
        )
    return model.get_submodule(LAYERS)


def load_backbone(model: nn.Module, reader: WeightReader, device: torch.device) -> nn.Module:
    """Materialise everything of the meta-device `model`'s base model except its blocks
    (embeddings, rotary tables, ...) on `device` in float32 with the checkpoint's weights,
    and return the base model. Buffers the checkpoint does not hold (rotary inverse
    frequencies, embedding scales) are computed by the model's own weight init."""
    base = model.get_submodule(_BASE)
    layers = base.get_submodule(_LIST)
    for child_name, child in base.named_children():
        if child is layers:
            continue
        child.to_empty(device=device).float()
        for module in child.modules():
            model._init_weights(module)
        tensors = list(child.named_parameters()) + list(child.named_buffers())
        for name, tensor in tensors:
            key = f"{_BASE}.{child_name}.{name}"
            with torch.no_grad():
                if key in reader:
                    tensor.copy_(reader.get(key).to(tensor.dtype))
                elif isinstance(tensor, nn.Parameter):
                    raise BadInputError(
                        f"checkpoint lacks weight '{key}': the folder is incomplete"
                    )
    return base


def release_backbone(base: nn.Module) -> None:
    """Hand back what `load_backbone` materialised (the blocks stay as they are)."""
    layers = base.get_submodule(_LIST)
    for child in base.children():
        if child is not layers:
            child.to("meta")


class _Stop(Exception):
    """Raised by a recorder once it has what it came for: the rest of the model is skipped."""


class _Recorder(nn.Module):
    """Stands in for block `index`: records what the model calls it with, returns the hidden
    states unchanged (so the blocks after it see the same tensor), and stops the forward at
    block `stop`. Attribute reads fall through to the block (models read `attention_type`)."""

    def __init__(self, block: nn.Module, index: int, stop: int, seen: dict) -> None:
        super().__init__()
        self.block, self.index, self.stop, self.seen = block, index, stop, seen

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.seen[self.index] = (hidden, LayerCall(args, kwargs))
        if self.index == self.stop:
            raise _Stop
        return hidden


@contextmanager
def _recording(layers: nn.ModuleList, stop: int) -> Iterator[dict[int, tuple]]:
    seen: dict[int, tuple] = {}
    blocks = list(layers)
    for index, block in enumerate(blocks):
        layers[index] = _Recorder(block, index, stop, seen)
    try:
        yield seen
    finally:
        for index, block in enumerate(blocks):
            layers[index] = block


def _probe(base: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, stop: int) -> dict:
    device = next(base.parameters()).device
    with _recording(layers, stop) as seen, torch.no_grad(), suppress(_Stop):
        base(input_ids=ids.to(device), use_cache=False)
    return seen


def layer_calls(base: nn.Module, layers: nn.ModuleList, seqlen: int) -> list[LayerCall]:
    """What the model passes each block besides the hidden states, for windows of `seqlen`
    tokens (recorded from one window; it broadcasts over any batch)."""
    device = next(base.parameters()).device
    probe = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    seen = _probe(base, layers, probe, len(layers) - 1)
    missing = [i for i in range(len(layers)) if i not in seen]
    assert not missing, f"the model's forward never called blocks {missing}"
    return [seen[i][1] for i in range(len(layers))]


def embed(base: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The first block's input for every window of `ids` (int64 [n, seq]): the model's own
    embedding (and its scaling), float32 on the backbone's device."""
    out = []
    for start in range(0, ids.shape[0], batch):
        seen = _probe(base, layers, ids[start : start + batch], 0)
        out.append(seen[0][0].float())
    return torch.cat(out)
