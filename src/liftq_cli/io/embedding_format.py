"""How a packed model stores its token embedding and lm_head: tensors, shapes, bytes.

The token embedding `model.embed_tokens` and the output projection `lm_head` (vocab V x
hidden h) are stored at one of these precisions; `liftq pack --embed/--lm-head` writes exactly
the tensors `embedding_tensors` lists, the runtime (runtime/embeddings.py) allocates them from
the same table, and `liftq plan` prices them with `embedding_bytes`, the closed-form sum of
their sizes (docs/FORMAT.md, "Embeddings and lm_head"). Pure Python: no torch, no disk.

    fp16, host  weight   --dtype [V, h]             (host: kept in host RAM at run time)
    int8        qweight  int8  [V, h]               q in [-127, 127]
                qscale   fp16  [V]                  one scale per row: max |w| / 127
    int4        qweight  uint8 [V, ceil(h/2)]       two codes per byte (q + 8), even column low
                qscale   fp16  [V, ceil(h/group)]   one scale per `group` (128) columns of a
                                                    row: max |w| / 7, q in [-7, 7]

Bit layouts and quantizers: `liftq_kernels.qlinear_ref`. The `quantization_config` records
the choice (`EmbeddingLayout.as_config`); files without those keys are fp16 / fp16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from liftq_cli.errors import BadInputError

EMBED_CHOICES = ("fp16", "int8", "int4", "host")
LM_HEAD_CHOICES = ("fp16", "int8", "int4")
DEFAULT_EMBED = "host"  # the plan's defaults, and so `liftq pack`'s
DEFAULT_LM_HEAD = "int8"
INT4_GROUP = 128
EMBED_MODULE = "model.embed_tokens"
LM_HEAD_MODULE = "lm_head"
MATRIX_PARTS = {EMBED_MODULE: "embed", LM_HEAD_MODULE: "lm_head"}
"""Module of a stored embedding-like matrix -> the byte-report part it belongs to."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class MatrixTensor:
    """Shape and dtype of one stored tensor of an embedding or lm_head."""

    shape: tuple[int, ...]
    dtype: str  # a key of DTYPE_BYTES

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class EmbeddingLayout:
    """How the embedding and lm_head are stored.

    tied: the source model ties its lm_head to the embedding. A tied pair at one precision
    (`shared`) is stored once, under the embedding, and the lm_head computes with it; tied
    at different precisions, each is stored at its own (the lm_head quantized from the
    embedding matrix): the GPU then holds the lm_head and, unless it is `host`, the embedding.
    """

    embed: str = "fp16"
    lm_head: str = "fp16"
    tied: bool = False
    group: int = INT4_GROUP

    def __post_init__(self) -> None:
        if self.embed not in EMBED_CHOICES:
            raise BadInputError(
                f"--embed '{self.embed}' is unknown: use one of {', '.join(EMBED_CHOICES)}"
            )
        if self.lm_head not in LM_HEAD_CHOICES:
            raise BadInputError(
                f"--lm-head '{self.lm_head}' is unknown: use one of {', '.join(LM_HEAD_CHOICES)}"
            )
        if isinstance(self.group, bool) or self.group < 2 or self.group & (self.group - 1):
            raise BadInputError(f"int4 group {self.group!r} must be a power of two >= 2")

    @property
    def shared(self) -> bool:
        """The lm_head computes with the embedding's tensors (stored once)."""
        return self.tied and self.embed == self.lm_head

    def stored(self) -> dict[str, str]:
        """{module: precision} of every matrix in the file, embedding first."""
        if self.shared:
            return {EMBED_MODULE: self.embed}
        return {EMBED_MODULE: self.embed, LM_HEAD_MODULE: self.lm_head}

    def as_config(self) -> dict[str, Any]:
        """The `quantization_config` keys; `tied` there means stored once (`shared`)."""
        return {
            "embed": self.embed,
            "lm_head": self.lm_head,
            "tied": self.shared,
            "int4_group": self.group,
        }


def matrix_tensors(
    rows: int, cols: int, precision: str, dtype: str = "float16", group: int = INT4_GROUP
) -> dict[str, MatrixTensor]:
    """The tensors of one (rows, cols) embedding-like matrix (names within the module)."""
    if precision in ("fp16", "host"):
        return {"weight": MatrixTensor((rows, cols), dtype)}
    if precision == "int8":
        return {
            "qweight": MatrixTensor((rows, cols), "int8"),
            "qscale": MatrixTensor((rows,), "float16"),
        }
    if precision == "int4":
        return {
            "qweight": MatrixTensor((rows, -(-cols // 2)), "uint8"),
            "qscale": MatrixTensor((rows, -(-cols // group)), "float16"),
        }
    raise BadInputError(
        f"precision '{precision}' is unknown: use one of {', '.join(EMBED_CHOICES)}"
    )


def stored_matrix_bytes(rows: int, cols: int, precision: str, group: int = INT4_GROUP) -> int:
    """Bytes of one matrix in the file, at a 2-byte `--dtype` for fp16 / host:

    fp16, host: 2 r c;  int8: r c + 2 r;  int4: r ceil(c/2) + 2 r ceil(c/group).
    """
    return sum(spec.nbytes for spec in matrix_tensors(rows, cols, precision, group=group).values())


def embedding_tensors(
    vocab: int, hidden: int, layout: EmbeddingLayout, dtype: str = "float16"
) -> dict[str, MatrixTensor]:
    """{full tensor name: spec} of the embedding and lm_head, in file order."""
    return {
        f"{module}.{name}": spec
        for module, precision in layout.stored().items()
        for name, spec in matrix_tensors(vocab, hidden, precision, dtype, layout.group).items()
    }


def embedding_bytes(vocab: int, hidden: int, layout: EmbeddingLayout) -> dict[str, int]:
    """File bytes {"embed", "lm_head"} (2-byte `--dtype`); lm_head is 0 when `shared`."""
    parts = dict.fromkeys(MATRIX_PARTS.values(), 0)
    for module, precision in layout.stored().items():
        parts[MATRIX_PARTS[module]] = stored_matrix_bytes(vocab, hidden, precision, layout.group)
    return parts


def parse_embeddings(config: Mapping[str, Any], where: str) -> EmbeddingLayout:
    """The `EmbeddingLayout` a `quantization_config` records; fp16 / fp16 when it has none
    (files packed before these keys existed). `tied` is the stored-once flag."""
    embed, lm_head = config.get("embed", "fp16"), config.get("lm_head", "fp16")
    tied, group = config.get("tied", False), config.get("int4_group", INT4_GROUP)
    if embed not in EMBED_CHOICES or lm_head not in LM_HEAD_CHOICES:
        bad = ("embed", embed) if embed not in EMBED_CHOICES else ("lm_head", lm_head)
        raise BadInputError(
            f"{where}: quantization_config.{bad[0]} {bad[1]!r} is unknown to this liftq: "
            f"re-pack the model or upgrade liftq"
        )
    if not isinstance(tied, bool) or (tied and embed != lm_head):
        raise BadInputError(
            f"{where}: quantization_config.tied {tied!r} does not fit embed {embed!r}, lm_head "
            f"{lm_head!r}: re-pack the model"
        )
    if isinstance(group, bool) or not isinstance(group, int) or group < 2 or group & (group - 1):
        raise BadInputError(
            f"{where}: quantization_config.int4_group {group!r} must be a power of two: re-pack"
        )
    return EmbeddingLayout(embed, lm_head, tied=tied, group=group)
