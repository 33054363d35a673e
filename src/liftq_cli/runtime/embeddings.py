"""The embedding and lm_head of a packed model, as `liftq pack --embed/--lm-head` stored them.

* `QuantEmbedding`: an int8 / int4 table on the model's device; a lookup dequantizes only the
  rows it gathers.
* `HostEmbedding`: the fp16 table stays in host memory (pinned when CUDA is available) wherever
  the model moves; each call gathers its token ids' rows on the host and copies them to the
  ids' device (a pinned staging buffer makes the copy asynchronous).
* `QuantLMHead`: y = x W^T with W int8 / int4, through `liftq_kernels.qlinear_ops.qlinear`
  (Triton on CUDA, torch elsewhere); of a tied pair stored once it computes with the
  embedding's tensors.

Buffers are exactly the tensors `io.embedding_format.matrix_tensors` lists, so the packed
file loads into them by name. fp16 parts stay transformers' own `nn.Embedding` / `nn.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn

from liftq_cli.errors import BadInputError
from liftq_cli.io.embedding_format import (
    EMBED_MODULE,
    INT4_GROUP,
    LM_HEAD_MODULE,
    EmbeddingLayout,
    matrix_tensors,
)
from liftq_cli.io.packed import TORCH_DTYPES
from liftq_kernels.qlinear_ops import qlinear
from liftq_kernels.qlinear_ref import dequantize


class _ComputeDtype(nn.Module):
    """Remembers the float dtype the model computes in, which `.half()`/`.to(dtype)` change
    (the stored tables keep theirs): the embedding returns rows in it."""

    compute_dtype: torch.dtype
    embed_scale: float | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _finish(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = rows.to(self.compute_dtype)
        if self.embed_scale is not None:  # Gemma-3 style scaled embeddings
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype, device=rows.device)
        return rows.view(*ids.shape, rows.shape[-1])


def _register(
    module: nn.Module, rows: int, cols: int, precision: str, device, group: int = INT4_GROUP
) -> None:
    """Empty buffers for the tensors the format stores for this matrix."""
    for name, spec in matrix_tensors(rows, cols, precision, group=group).items():
        empty = torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype], device=device)
        module.register_buffer(name, empty)


class QuantEmbedding(_ComputeDtype):
    """Drop-in for `nn.Embedding(num_embeddings, embedding_dim)` with an int8 / int4 table."""

    qweight: torch.Tensor  # int8 [V, h] or uint8 [V, ceil(h/2)]
    qscale: torch.Tensor  # fp16 [V] or [V, ceil(h/group)]

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        precision: str,
        group: int,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        embed_scale: float | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.precision, self.group = precision, group
        self.compute_dtype, self.embed_scale = compute_dtype, embed_scale
        _register(self, num_embeddings, embedding_dim, precision, device, group)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int -> [..., embedding_dim] in the model's compute dtype."""
        ids = input_ids.reshape(-1)
        rows = dequantize(
            self.qweight.index_select(0, ids),
            self.qscale.index_select(0, ids),
            self.embedding_dim,
            self.group,
        )
        return self._finish(rows, input_ids)

    def dequantize(self) -> torch.Tensor:
        """The table this module looks up, float32 [V, h] (for checks)."""
        return dequantize(self.qweight, self.qscale, self.embedding_dim, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.precision}"


class HostEmbedding(_ComputeDtype):
    """Drop-in for `nn.Embedding` whose table never leaves host memory."""

    weight: torch.Tensor  # [V, h] at the packed --dtype, on the CPU once loaded

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        embed_scale: float | None = None,
    ):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype, self.embed_scale = compute_dtype, embed_scale
        _register(self, num_embeddings, embedding_dim, "host", device)
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """`model.to(...)` moves everything but the table (dtype changes reach the rows)."""
        weight = self._buffers.pop("weight")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["weight"] = weight

    def to_host(self) -> None:
        """Move a loaded table to host memory, pinned when CUDA is available."""
        weight = self._buffers["weight"]
        if weight is None or weight.is_meta:
            return
        weight = weight.detach().to("cpu")
        if torch.cuda.is_available() and not weight.is_pinned():
            weight = weight.pin_memory()
        self._buffers["weight"] = weight

    def _stage(self, rows: int) -> torch.Tensor:
        """A pinned [rows, h] buffer, free once the previous copy from it has finished."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._staging is None or self._staging.shape[0] < rows:
            shape = (rows, self.embedding_dim)
            self._staging = torch.empty(shape, dtype=self.weight.dtype, pin_memory=True)
        return self._staging[:rows]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [...] int on any device -> [..., embedding_dim] on the ids' device."""
        ids = input_ids.reshape(-1)
        host_ids = ids.to(self.weight.device)
        if ids.is_cuda and self.weight.is_pinned():
            staging = self._stage(ids.numel())
            torch.index_select(self.weight, 0, host_ids, out=staging)
            rows = staging.to(ids.device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            rows = self.weight.index_select(0, host_ids).to(ids.device)
        return self._finish(rows, input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host"


class QuantLMHead(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features, bias=False)`, W int8 / int4.

    With `shared` (a tied pair stored once) it has no tensors of its own and reads the
    embedding's, so the matrix is stored and loaded once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        precision: str,
        group: int,
        device: torch.device | str | None = None,
        shared: QuantEmbedding | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.precision, self.group = precision, group
        self.register_parameter("bias", None)
        if shared is None:
            _register(self, out_features, in_features, precision, device, group)
        # Not a submodule: the embedding owns the tensors (saved once, moved once).
        object.__setattr__(self, "shared", shared)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.shared if self.shared is not None else self
        return owner._buffers["qweight"], owner._buffers["qscale"]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] float -> logits [..., out_features] in x.dtype."""
        qweight, qscale = self._tensors()
        y = qlinear(x.reshape(-1, self.in_features), qweight, qscale, self.group)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, float32 [out, in] (for checks)."""
        qweight, qscale = self._tensors()
        return dequantize(qweight, qscale, self.in_features, self.group)

    def extra_repr(self) -> str:
        tied = ", tied to the embedding" if self.shared is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"{self.precision}{tied}"
        )


def _embedding(model: nn.Module, name: str, layout: EmbeddingLayout, device) -> nn.Module:
    old = model.get_submodule(name)
    scale = getattr(old, "scalar_embed_scale", None)
    if not isinstance(old, nn.Embedding) or (type(old) is not nn.Embedding and scale is None):
        raise BadInputError(
            f"'{name}' is a {type(old).__name__}, not a plain nn.Embedding: --embed "
            f"{layout.embed} is not supported for it; re-pack with --embed fp16"
        )
    dtype = old.weight.dtype
    rows, cols = old.num_embeddings, old.embedding_dim
    if layout.embed == "host":
        return HostEmbedding(rows, cols, dtype, device, scale)
    return QuantEmbedding(rows, cols, layout.embed, layout.group, dtype, device, scale)


def replace_embeddings(
    model: nn.Module,
    layout: EmbeddingLayout,
    device: torch.device | str | None = None,
    prefix: str = "",
) -> None:
    """Swap the embedding and lm_head for the modules `layout` stores (fp16 ones stay).

    prefix: stripped from the format's module names (a base model has no `model.` level and
    no lm_head). Raises BadInputError for a module that is not a plain embedding / bias-free
    linear of the right kind.
    """
    if (layout.embed, layout.lm_head) == ("fp16", "fp16"):
        return  # transformers' own modules (and any architecture's names) as they are
    embed_name = EMBED_MODULE.removeprefix(prefix)
    embed = model.get_submodule(embed_name)
    if layout.embed != "fp16":
        embed = _embedding(model, embed_name, layout, device)
        model.set_submodule(embed_name, embed)
    head_name = LM_HEAD_MODULE.removeprefix(prefix)
    if layout.lm_head == "fp16" or not hasattr(model, head_name):
        return
    old = model.get_submodule(head_name)
    if not isinstance(old, nn.Linear) or old.bias is not None:
        raise BadInputError(
            f"'{head_name}' is a {type(old).__name__} with a bias or not an nn.Linear: --lm-head "
            f"{layout.lm_head} is not supported for it; re-pack with --lm-head fp16"
        )
    shared = embed if layout.tied and isinstance(embed, QuantEmbedding) else None
    head = QuantLMHead(
        old.in_features, old.out_features, layout.lm_head, layout.group, device, shared
    )
    model.set_submodule(head_name, head)


def place_on_host(model: nn.Module) -> None:
    """After loading: move every `HostEmbedding` table to (pinned) host memory."""
    for module in model.modules():
        if isinstance(module, HostEmbedding):
            module.to_host()
