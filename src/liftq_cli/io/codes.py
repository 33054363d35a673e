"""Sign codes on disk, one bit per code bit.

    bool [out, slices, D] (True = +1)  <->  int32 [out, ceil(slices * D / 32)]

in the packed format's bit layout (`liftq_kernels.reference.pack_bits`: bit j of a row is bit
j % 32 of word j // 32), so the work dir, the quantize output and the packed model all store
the same words and `liftq pack` copies them. Rows are packed a chunk at a time, which bounds
the int64 scratch of `pack_bits` (8 bytes per bit) to CHUNK_BITS * 8 bytes.
"""

from __future__ import annotations

import torch

from liftq_cli.errors import BadInputError
from liftq_kernels.reference import pack_bits, unpack_bits

CHUNK_BITS = 1 << 24  # 128 MiB of scratch per chunk
WORD_BITS = 32


def words_per_row(slices: int, D: int) -> int:
    return -(-slices * D // WORD_BITS)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """bool [out, slices, D] -> int32 [out, words_per_row(slices, D)]."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [out, slices, D], got shape {tuple(codes.shape)}")
    out, slices, D = codes.shape
    flat = codes.reshape(out, slices * D).bool()
    if out == 0:
        return torch.zeros(0, words_per_row(slices, D), dtype=torch.int32, device=codes.device)
    rows = max(1, CHUNK_BITS // max(slices * D, 1))
    return torch.cat([pack_bits(chunk) for chunk in flat.split(rows)])


def unpack_codes(words: torch.Tensor, slices: int, D: int, name: str = "codes") -> torch.Tensor:
    """int32 [out, words_per_row(slices, D)] -> bool [out, slices, D]: inverse of pack_codes.

    A tensor of the wrong dtype or width is a corrupt file: BadInputError naming `name`.
    """
    if words.dtype != torch.int32 or words.dim() != 2 or words.shape[1] != words_per_row(slices, D):
        raise BadInputError(
            f"{name} has dtype {words.dtype} and shape {tuple(words.shape)}, expected int32 "
            f"[out, {words_per_row(slices, D)}] for {slices} slices of {D} bits: the file is "
            f"corrupt; re-run `liftq quantize`"
        )
    rows = max(1, CHUNK_BITS // max(slices * D, 1))
    parts = [unpack_bits(chunk, slices * D) for chunk in words.split(rows)] if len(words) else []
    empty = torch.zeros(0, slices * D, dtype=torch.bool, device=words.device)
    bits = torch.cat(parts) if parts else empty
    return bits.view(words.shape[0], slices, D)
