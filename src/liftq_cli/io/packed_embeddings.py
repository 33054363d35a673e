"""The token embedding and lm_head of `liftq pack`, stored at --embed / --lm-head.

The tensors are those `io.embedding_format.embedding_tensors` lists (the table `liftq plan`
prices): fp16 and host keep the matrix at `--dtype`, int8 / int4 quantize it round-to-nearest
(`liftq_kernels.qlinear_ref`) from the quantize output's source-dtype copy. A tied source
(no `lm_head.weight` in the checkpoint) at one precision is stored once; at two, the lm_head
is quantized from the embedding matrix. Whenever either part is not fp16, transformers must
not tie the two itself, so the packed `config.json` says `tie_word_embeddings: false` and the
loader (runtime/embeddings.py) shares the tensors instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from liftq_cli.errors import BadInputError
from liftq_cli.io.embedding_format import (
    EMBED_MODULE,
    LM_HEAD_MODULE,
    MATRIX_PARTS,
    EmbeddingLayout,
    embedding_tensors,
)
from liftq_cli.io.safetensors_stream import TensorSpec
from liftq_kernels.qlinear_ref import quantize_int4, quantize_int8

EMBED_SOURCE = f"{EMBED_MODULE}.weight"
LM_HEAD_SOURCE = f"{LM_HEAD_MODULE}.weight"
MATRIX_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def matrix_part(name: str) -> str | None:
    """'embed' or 'lm_head' for a tensor of those modules (`MATRIX_PARTS`), else None."""
    return MATRIX_PARTS.get(name.rpartition(".")[0])


def pack_matrix(
    weight: torch.Tensor, precision: str, dtype: str, group: int
) -> dict[str, torch.Tensor]:
    """The stored tensors of one matrix [V, h] (names within the module, see the table)."""
    if precision in ("fp16", "host"):
        return {"weight": weight.to(MATRIX_DTYPES[dtype]).contiguous()}
    if precision == "int8":
        qweight, qscale = quantize_int8(weight)
    else:
        qweight, qscale = quantize_int4(weight, group)
    return {"qweight": qweight, "qscale": qscale}


@dataclass
class EmbeddingPack:
    """The embedding and lm_head of one pack: layout, shape, and the tensors once computed."""

    layout: EmbeddingLayout
    vocab: int
    hidden: int
    dtype: str  # --dtype: the float dtype of fp16 / host weights
    source: Path  # the quantize output's unquantized tensors
    _done: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def tensors(self) -> dict[str, Any]:
        return embedding_tensors(self.vocab, self.hidden, self.layout, self.dtype)

    def specs(self) -> list[TensorSpec]:
        """The stream specs, in file order."""
        return [
            TensorSpec(name, MATRIX_DTYPES[spec.dtype], spec.shape)
            for name, spec in self.tensors().items()
        ]

    def formula(self) -> dict[str, int]:
        """Bytes {"embed", "lm_head"} from the table (at `--dtype`)."""
        parts = dict.fromkeys(MATRIX_PARTS.values(), 0)
        for name, spec in self.tensors().items():
            parts[MATRIX_PARTS[name.rpartition(".")[0]]] += spec.nbytes
        return parts

    def produce(self, name: str) -> torch.Tensor:
        """One stored tensor; a module's tensors are computed together and kept until the
        next module (the quantized matrix is needed for both qweight and qscale)."""
        module, _, leaf = name.rpartition(".")
        if module not in self._done:
            self._done.clear()
            precision = self.layout.stored()[module]
            source = LM_HEAD_SOURCE if module == LM_HEAD_MODULE else EMBED_SOURCE
            if module == LM_HEAD_MODULE and self.layout.tied:
                source = EMBED_SOURCE  # a tied lm_head is the embedding matrix
            with safe_open(self.source, framework="pt") as handle:
                weight = handle.get_tensor(source)
            self._done[module] = pack_matrix(weight, precision, self.dtype, self.layout.group)
        return self._done[module][leaf]

    def update_config(self, config: dict[str, Any]) -> None:
        """Untie the pair for transformers in `config.json` unless both parts are plain fp16
        weights (then transformers' own tying is the stored-once form); liftq's loader shares
        quantized tensors itself."""
        if (self.layout.embed, self.layout.lm_head) != ("fp16", "fp16"):
            config["tie_word_embeddings"] = False


def embedding_pack(
    source: Path, names: set[str], embed: str, lm_head: str, dtype: str
) -> EmbeddingPack | None:
    """The `EmbeddingPack` for the quantize output's unquantized file `source` (tensor
    `names`), or None for fp16 / fp16 on a model without `model.embed_tokens.weight` (its
    tensors are then copied as they are, as before these options existed)."""
    layout = EmbeddingLayout(embed, lm_head)  # validates the choices
    if EMBED_SOURCE not in names:
        if (embed, lm_head) == ("fp16", "fp16"):
            return None
        raise BadInputError(
            f"--embed {embed} --lm-head {lm_head} needs the tensor {EMBED_SOURCE}, which "
            f"'{source}' lacks (this architecture names its embedding differently): pack with "
            f"--embed fp16 --lm-head fp16"
        )
    tied = LM_HEAD_SOURCE not in names
    with safe_open(source, framework="pt") as handle:
        shape = tuple(handle.get_slice(EMBED_SOURCE).get_shape())
        head = shape if tied else tuple(handle.get_slice(LM_HEAD_SOURCE).get_shape())
    if len(shape) != 2 or head != shape:
        raise BadInputError(
            f"'{source}': {EMBED_SOURCE} {list(shape)} and {LM_HEAD_SOURCE} {list(head)} must "
            f"both be [vocab, hidden]: re-run `liftq quantize`"
        )
    layout = EmbeddingLayout(embed, lm_head, tied=tied)
    return EmbeddingPack(layout, shape[0], shape[1], dtype, source)
