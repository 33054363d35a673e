"""`LiftQuantLinearMethod`: packed LiftQuant linears inside vLLM's (parallel) linear layers.

vLLM merges linears that read the same input (q/k/v into `qkv_proj`, gate/up into
`gate_up_proj`). Each original linear has its own whitening, so its own lift: the method keeps
one *part* per original linear and computes y = [y_q | y_k | y_v], each part through
`torch.ops.liftq.linear`. On one rank, with the parts of a merged layer:

    qweight  int32 [sum o_j, max W_j]   the parts' rows stacked (part j in its first W_j words)
    qscale   fp16  [sum o_j]
    s1, s2   fp16  [parts, n]           every part's whitening (n = the full input size)
    p1 / p1_signs, p2 / p2_signs  fp16 [parts, a, a] / int8 [parts, a] (format 2's table)

Column-parallel layers keep this rank's rows of each part (`sharding.column_rows`); a
row-parallel layer keeps its code words [w0, w1) of every row (`sharding.word_ranges`) and
all-gathers its input before the lift. The tensors load by their packed names: vLLM's loader
renames `q_proj.qweight` to `qkv_proj.qweight` and passes shard id `q`, and each tensor's own
`weight_loader` (set here) takes this rank's slice. `process_weights_after_loading` splits
the stacked tensors into per-part views (copies only when merged parts differ in width) and
rebuilds dense Hadamard factors from their signs once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.utils import set_weight_attrs

import liftq_kernels.custom_op  # noqa: F401  (registers torch.ops.liftq.linear)
from liftq_cli.io.packed import TORCH_DTYPES
from liftq_cli.io.packed_format import linear_tensors, words_per_row
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.vllm.sharding import column_rows, fused_rows, word_ranges
from liftq_kernels.reference import signed_hadamard

QKV_SHARDS = {"q": 0, "k": 1, "v": 2}
WHITENING = ("s1", "s2", "p1", "p2", "p1_signs", "p2_signs")


@dataclass(frozen=True)
class Part:
    """One original linear of a (merged) vLLM layer on this rank."""

    cfg: LatticeConfig
    row_start: int  # first row of this part in the stacked qweight / qscale
    rows: int  # this rank's rows of the part
    words: int  # this rank's words per row
    total_words: int  # words per row of the whole part
    word_start: int  # this rank's first word (row-parallel), else 0


@dataclass(frozen=True)
class Plan:
    """How a layer's packed tensors sit on this rank."""

    parts: tuple[Part, ...]
    in_features: int
    gather: bool  # row-parallel over several ranks: all-gather the input before the lift
    rank: int
    kv_replicas: int
    # a checkpoint linear vLLM would merge but the file stores fused (Phi-3's qkv_proj): one
    # part whose rows on this rank are these rows of the file's tensor; None otherwise
    fused: tuple[int, ...] | None = None


class LiftQuantLinearMethod(LinearMethodBase):
    """A LiftQuant linear method for one vLLM layer (its original linears' lattice configs)."""

    def __init__(self, qconfig, cfgs: list[LatticeConfig], prefix: str = "", fused: bool = False):  # type: ignore[no-untyped-def]
        self.qconfig = qconfig
        self.cfgs = cfgs
        self.prefix = prefix
        self.fused = fused  # one checkpoint linear behind all of vLLM's merged parts

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        del output_size, params_dtype, extra_weight_attrs  # the layout is the packed file's
        fused_rows_here = None
        tp_rank, tp_size = int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
        replicas = int(getattr(layer, "num_kv_head_replicas", 1))
        if self.fused and len(output_partition_sizes) > 1:
            sizes = list(output_partition_sizes)
            # q and merged parts split over the ranks; k and v over groups of `replicas`
            qkv = isinstance(layer, QKVParallelLinear)
            reps = [1] + [replicas] * (len(sizes) - 1) if qkv else [1] * len(sizes)
            full = [size * tp_size // rep for size, rep in zip(sizes, reps, strict=True)]
            fused_rows_here = tuple(fused_rows(sizes, full, tp_rank, reps))
            output_partition_sizes = [sum(sizes)]
        if len(output_partition_sizes) != len(self.cfgs):
            raise ValueError(
                f"liftquant: layer has {len(output_partition_sizes)} parts, the config "
                f"{len(self.cfgs)}"
            )
        n = input_size
        row_split = isinstance(layer, RowParallelLinear) and input_size_per_partition != n
        parts, start = [], 0
        for cfg, rows in zip(self.cfgs, output_partition_sizes, strict=True):
            total = words_per_row(n, cfg)
            w0, w1 = word_ranges(total, tp_size)[tp_rank] if row_split else (0, total)
            parts.append(Part(cfg, start, rows, w1 - w0, total, w0))
            start += rows
        plan = Plan(
            tuple(parts),
            n,
            gather=row_split and tp_size > 1,
            rank=tp_rank,
            kv_replicas=replicas,
            fused=fused_rows_here,
        )
        layer.liftq_plan = plan
        dense = self.qconfig.dense_factors  # whitening shapes depend on n (and that) only
        specs = linear_tensors(1, n, self.cfgs[0], dense_factors=dense)
        count = len(parts)
        shapes = {
            "qweight": ((start, max(p.words for p in parts)), "int32"),
            "qscale": ((start,), "float16"),
        }
        for name in specs:
            if name in WHITENING:
                shapes[name] = ((count, *specs[name].shape), specs[name].dtype)
        for name, (shape, dtype) in shapes.items():
            param = Parameter(torch.zeros(shape, dtype=TORCH_DTYPES[dtype]), requires_grad=False)
            layer.register_parameter(name, param)
            set_weight_attrs(
                param, {"weight_loader": self._loader(plan, name), "liftq_loaded": set()}
            )

    def _loader(self, plan: Plan, name: str):  # type: ignore[no-untyped-def]
        def load(param: Parameter, loaded: torch.Tensor, shard_id=None) -> None:  # type: ignore[no-untyped-def]
            index = QKV_SHARDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
            index = 0 if index is None else int(index)
            part = plan.parts[index]
            param.liftq_loaded.add(index)
            if name in ("qweight", "qscale"):
                rows = slice(part.row_start, part.row_start + part.rows)
                if plan.fused is not None:
                    _check(loaded.shape[0] > max(plan.fused), name, loaded, part.rows)
                    src = loaded[list(plan.fused)]
                else:
                    replicas = plan.kv_replicas if shard_id in ("k", "v") else 1
                    r0, r1 = column_rows(loaded.shape[0], part.rows, plan.rank, replicas)
                    src = loaded[r0:r1]
                if name == "qweight":
                    _check(src.shape[1] == part.total_words, name, loaded, part.total_words)
                    src = src[:, part.word_start : part.word_start + part.words]
                    param.data[rows, : part.words].copy_(src)
                else:
                    param.data[rows].copy_(src)
                return
            _check(tuple(loaded.shape) == tuple(param.shape[1:]), name, loaded, param.shape[1:])
            param.data[index].copy_(loaded)

        return load

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        plan: Plan = layer.liftq_plan
        for name, param in layer.named_parameters(recurse=False):
            missing = set(range(len(plan.parts))) - getattr(param, "liftq_loaded", set(range(99)))
            if missing:
                raise ValueError(
                    f"liftquant: {self.prefix}.{name} of part {sorted(missing)} is not in the "
                    f"checkpoint: re-pack the model with `liftq pack`"
                )
        device = layer.qweight.device
        copied = False
        for j, part in enumerate(plan.parts):
            rows = slice(part.row_start, part.row_start + part.rows)
            words = layer.qweight.data[rows, : part.words]
            if not words.is_contiguous():
                words, copied = words.contiguous(), True
            tensors = {"words": words, "scale": layer.qscale.data[rows]}
            for name in ("s1", "s2"):
                tensors[name] = getattr(layer, name).data[j]
            for name in ("p1", "p2"):
                signs = getattr(layer, f"{name}_signs", None)
                tensors[name] = (
                    signed_hadamard(signs.data[j])
                    if signs is not None
                    else getattr(layer, name).data[j]
                )
            lattice = self.qconfig.lattices[part.cfg.name]
            tensors["lattice"] = torch.tensor(lattice, dtype=torch.float32, device=device)
            for key, value in tensors.items():
                layer.register_buffer(f"liftq_{key}_{j}", value, persistent=False)
        if copied:  # every part now has its own words: the stacked tensor is not needed
            del layer._parameters["qweight"]

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        plan: Plan = layer.liftq_plan
        flat = x.reshape(-1, x.shape[-1])
        if plan.gather:
            from vllm.distributed import tensor_model_parallel_all_gather

            flat = tensor_model_parallel_all_gather(flat, dim=-1)
        outs = []
        for j, part in enumerate(plan.parts):
            words = getattr(layer, f"liftq_words_{j}")
            if part.words == 0:  # an empty row-parallel shard (tiny layers, many ranks)
                outs.append(flat.new_zeros(flat.shape[0], part.rows))
                continue
            outs.append(
                torch.ops.liftq.linear(
                    flat,
                    words,
                    getattr(layer, f"liftq_scale_{j}"),
                    getattr(layer, f"liftq_s1_{j}"),
                    getattr(layer, f"liftq_p1_{j}"),
                    getattr(layer, f"liftq_p2_{j}"),
                    getattr(layer, f"liftq_s2_{j}"),
                    getattr(layer, f"liftq_lattice_{j}"),
                    part.word_start,
                    part.total_words,
                )
            )
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _check(ok: bool, name: str, loaded: torch.Tensor, expected) -> None:  # type: ignore[no-untyped-def]
    if not ok:
        raise ValueError(
            f"liftquant: checkpoint tensor {name} has shape {tuple(loaded.shape)}, the layer "
            f"expects {tuple(expected) if not isinstance(expected, int) else expected} "
            f"(words per row): re-pack the model with this liftq"
        )
