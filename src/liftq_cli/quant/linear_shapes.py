"""Per-linear sizes of a decoder and the checks and averages made from them, keyed (layer,
kind) as recipes name linears (`layers.3.down_proj`)."""

from __future__ import annotations

from collections.abc import Callable

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig

Shapes = dict[tuple[int, str], tuple[int, int]]


def linear_shapes(skeleton) -> Shapes:
    """(layer, kind) -> (out, in) of every decoder linear, read off the meta-device model.
    Linears of one kind in one block (each expert's gate_proj, and a shared expert's) count
    together: their rows summed when they read one width, else as (weights, 1)."""
    from liftq_cli.quant.decoder import find_layers
    from liftq_cli.quant.exchange import linear_kinds

    shapes: Shapes = {}
    for layer, block in enumerate(find_layers(skeleton, skeleton.config.num_hidden_layers)):
        for name, m in linear_kinds(block).items():
            key = (layer, name.rpartition(".")[2])
            out, width = shapes.get(key, (0, m.in_features))
            if width == m.in_features:
                shapes[key] = (out + m.out_features, width)
            else:
                shapes[key] = (out * width + m.out_features * m.in_features, 1)
    return shapes


def check_overrides(layers, shapes: Shapes) -> None:
    """Refuse per-layer overrides that name a block or linear this model does not have."""
    count = 1 + max((layer for layer, _ in shapes), default=-1)
    kinds = sorted({kind for _, kind in shapes})
    for layer, overrides in sorted(layers.items()):
        if layer >= count:
            raise BadInputError(
                f"recipe overrides layer {layer} but the model has {count} layers (0 to "
                f"{count - 1}): re-run `liftq plan --write-recipe` for this model"
            )
        for kind in overrides:
            if (layer, kind) not in shapes:
                raise BadInputError(
                    f"recipe overrides layers.{layer}.{kind} but this model's linears are "
                    f"{', '.join(kinds)}: re-run `liftq plan --write-recipe` for this model"
                )


def average_bits(shapes: Shapes, config_for: Callable[[int, str], LatticeConfig]) -> float:
    """Code bits per weight over all decoder linears (D/d weighted by each linear's size)."""
    total = sum(o * i for o, i in shapes.values())
    bits = sum(o * i * config_for(*key).bits for key, (o, i) in shapes.items()) / max(total, 1)
    return round(bits, 6)
