"""`LiftQuantMatrixMethod`: an int8 or int4 token embedding or lm_head in vLLM.

The tensors are `io.embedding_format.matrix_tensors`' (int8: qweight int8 [V, h] and one fp16
scale per row; int4: two codes per byte and one fp16 scale per `group` columns). Both split
over tensor-parallel ranks by vocabulary rows, which vLLM's own embedding loader does for any
tensor marked `output_dim = 0`. The lm_head computes `liftq_kernels.qlinear` (Triton on CUDA,
torch on CPU); the embedding dequantizes only the looked-up rows.
"""

from __future__ import annotations

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.utils import set_weight_attrs

from liftq_cli.io.embedding_format import matrix_tensors
from liftq_cli.io.packed import TORCH_DTYPES
from liftq_kernels.qlinear_ops import qlinear
from liftq_kernels.qlinear_ref import dequantize


class LiftQuantMatrixMethod(QuantizeMethodBase):
    """int8 / int4 rows of a vocabulary-parallel embedding or lm_head."""

    def __init__(self, precision: str, group: int):
        self.precision = precision
        self.group = group

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
        del input_size, output_size
        rows, cols = sum(output_partition_sizes), input_size_per_partition
        layer.liftq_cols = cols
        layer.liftq_dtype = params_dtype
        loader = extra_weight_attrs.pop("weight_loader")  # vLLM's: narrows to this rank's rows

        def load(param: Parameter, loaded: torch.Tensor, *args) -> None:  # type: ignore[no-untyped-def]
            loader(param, loaded, *args)
            param.liftq_loaded = True

        for name, spec in matrix_tensors(rows, cols, self.precision, group=self.group).items():
            param = Parameter(
                torch.zeros(spec.shape, dtype=TORCH_DTYPES[spec.dtype]), requires_grad=False
            )
            attrs = {"output_dim": 0, "weight_loader": load, "liftq_loaded": False}
            set_weight_attrs(param, {**attrs, **extra_weight_attrs})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # A tied lm_head holds the embedding's tensors, loaded under the embedding's names.
        for name in ("qweight", "qscale"):
            if not getattr(getattr(layer, name), "liftq_loaded", False):
                raise ValueError(
                    f"liftquant: {self.precision} {name} of {type(layer).__name__} is not in the "
                    f"checkpoint: re-pack the model with `liftq pack`"
                )

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = qlinear(flat, layer.qweight, layer.qscale, self.group)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        ids = input_.reshape(-1)
        rows = dequantize(layer.qweight[ids], layer.qscale[ids], layer.liftq_cols, self.group)
        return rows.to(layer.liftq_dtype).reshape(*input_.shape, layer.liftq_cols)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        layer.qweight = embed_tokens.qweight
        layer.qscale = embed_tokens.qscale
        return layer
