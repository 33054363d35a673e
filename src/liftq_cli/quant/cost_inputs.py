"""Which statistics a block's encoding measures, for the cost model and the footprint.

Linears that read the same tensor share one Gram matrix (INPUT_GROUP: q/k/v, gate/up); with
`true_sequential` the statistics are measured one dataflow stage at a time (STAGE), each
stage in its own forward pass, and with `compensate` a full-precision pass beside each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from liftq_cli.quantize_job import QuantizeSettings

if TYPE_CHECKING:  # costmodel imports this module
    from liftq_cli.quant.costmodel import LinearWork

INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out"}
INPUT_GROUP |= {"gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}
INPUT_GROUP |= {"shared_gate_proj": "shared_in", "shared_up_proj": "shared_in"}
INPUT_GROUP |= {"shared_down_proj": "shared_mid"}
# dataflow stage of a linear kind (quant/stages.py finds them from the block; the estimate
# names them): attention inputs 0, MLA's second projections 1, attention output 2, MLP
# inputs 3, MLP output 4; every other kind reads the block input (0)
STAGE = {"q_b_proj": 1, "kv_b_proj": 1, "o_proj": 2, "out_proj": 2, "down_proj": 4}
STAGE |= dict.fromkeys(("gate_proj", "up_proj", "gate_up_proj"), 3)
STAGE |= {"shared_gate_proj": 3, "shared_up_proj": 3, "shared_down_proj": 4}


def distinct_inputs(work: Sequence[LinearWork]) -> dict[str, tuple[int, int, float]]:
    """{input group: (n, count, share)}: one Gram matrix per group and matrix count."""
    groups: dict[str, tuple[int, int, float]] = {}
    for lin in work:
        groups.setdefault(INPUT_GROUP.get(lin.kind, lin.kind), (lin.inp, lin.count, lin.share))
    return groups


def input_stages(
    work: Sequence[LinearWork], settings: QuantizeSettings
) -> list[tuple[dict[str, tuple[int, int, float]], list[LinearWork]]]:
    """(distinct inputs, linears) of each stage statistics are measured in: the dataflow
    stages with true_sequential (STAGE), else one."""
    if not settings.true_sequential:
        return [(distinct_inputs(work), list(work))]
    levels = sorted({STAGE.get(lin.kind, 0) for lin in work})
    stages = [[x for x in work if STAGE.get(x.kind, 0) == level] for level in levels]
    return [(distinct_inputs(stage), stage) for stage in stages]


def stats_passes(work: Sequence[LinearWork], settings: QuantizeSettings) -> int:
    """Forward passes of the statistics: one per stage, and with compensate one of the
    full-precision block per stage (not the first for independent blocks, whose inputs are
    the full-precision ones)."""
    stages = len(input_stages(work, settings))
    if not settings.compensate:
        return stages
    return 2 * stages - (0 if settings.sequential else 1)
