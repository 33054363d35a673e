"""The LiftQuant linear as one call, dispatched to Triton on CUDA and to torch elsewhere.

    y = diag(s) Q (blockdiag(M)^T T^-1 x)

`backend="auto"` uses the Triton kernels for CUDA tensors (decode path for at most
`DECODE_MAX_ROWS` rows, prefill path above) and the float32 torch reference otherwise (CPU);
`LIFTQ_BACKEND=torch|triton` overrides it (`triton` on CPU needs `TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache

import torch
import torch.nn.functional as F

from liftq_kernels.autotune import DECODE_MAX_ROWS, LUT_MAX_ROWS
from liftq_kernels.reference import WORD_BITS, bitmm_ref, in_code_order, lift_ref

BACKENDS = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    """True when Triton is installed (Linux); the torch path needs nothing beyond torch."""
    return importlib.util.find_spec("triton") is not None


def pick_backend(x: torch.Tensor, backend: str = "auto") -> str:
    """'triton' or 'torch' for activations `x` (see the module docstring)."""
    backend = os.environ.get("LIFTQ_BACKEND", backend) if backend == "auto" else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    return backend


@cache
def _byte_patterns(device: torch.device) -> torch.Tensor:
    """float32 [256, 8]: row v holds the signs (+-1) of the 8 bits of byte v, LSB first."""
    values = torch.arange(256, device=device).unsqueeze(1)
    return ((values >> torch.arange(8, device=device)) & 1).float() * 2 - 1


def lut_bitmm(z: torch.Tensor, words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = (z @ Q^T) * s through byte lookup tables (torch path for a few rows).

    For every 8 consecutive entries of a row of z the 256 possible signed sums are tabulated
    ([B, K/8, 256]); each code byte then picks its entry, so the work per weight is one
    gather of a byte instead of unpacking 8 signs. z: [B, K] float; words: int32 [N, W];
    scale: [N]. Returns float32 [B, N]. Needs a little-endian host (bytes of an int32).
    """
    rows, k = z.shape
    codes = words.view(torch.uint8)  # [N, 4W]: byte j holds bits 8j .. 8j+7
    n_bytes = codes.shape[1]
    padded = F.pad(z.float(), (0, 8 * n_bytes - k)).view(rows, n_bytes, 8)
    table = (padded @ _byte_patterns(z.device).T).reshape(rows, n_bytes * 256)
    index = codes.long() + torch.arange(n_bytes, device=z.device) * 256  # [N, 4W]
    picked = torch.stack([torch.take(table[r], index).sum(-1) for r in range(rows)])
    return picked * scale.float()


def torch_linear(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    word_offset: int = 0,
    total_words: int | None = None,
) -> torch.Tensor:
    """Torch path: float32 lift, z moved into the codes' bit order, then byte lookup tables
    (at most `LUT_MAX_ROWS` rows) or the signs unpacked for this call and one matmul (both
    read `words` as a plain bitstream). Returns x.dtype."""
    total = words.shape[1] if total_words is None else total_words
    z = in_code_order(lift_ref(x, s1, p1, p2, s2, lattice), total)
    z = z[:, WORD_BITS * word_offset : WORD_BITS * (word_offset + words.shape[1])]
    if z.shape[0] <= LUT_MAX_ROWS and sys.byteorder == "little":
        return lut_bitmm(z, words, scale).to(x.dtype)
    return bitmm_ref(z, words, scale).to(x.dtype)


def triton_linear(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    word_offset: int = 0,
    total_words: int | None = None,
) -> torch.Tensor:
    """Triton path: lift kernels, then the decode GEMV (at most `DECODE_MAX_ROWS` rows) or the
    prefill GEMM. Every shape runs on the kernels (no torch fallback). Returns x.dtype."""
    from liftq_kernels.bitgemm import bitgemm
    from liftq_kernels.bitgemv import bitgemv
    from liftq_kernels.lift import lift

    total = words.shape[1] if total_words is None else total_words
    z, z_scale = lift(x, s1, p1, p2, s2, lattice, k_padded=total * WORD_BITS)
    if total != words.shape[1]:  # a shard of the words: its columns of z (a strided view)
        z = z[:, WORD_BITS * word_offset : WORD_BITS * (word_offset + words.shape[1])]
    if x.shape[0] <= DECODE_MAX_ROWS:
        return bitgemv(z, z_scale, words, scale, out_dtype=x.dtype)
    return bitgemm(z, z_scale, words, scale, out_dtype=x.dtype)


def liftq_linear(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    backend: str = "auto",
    word_offset: int = 0,
    total_words: int | None = None,
) -> torch.Tensor:
    """One LiftQuant linear: x [B, n] -> y [B, N] in x.dtype (no bias).

    words: int32 [N, W] format-2 codes (`reference.pack_interleaved`, W = padded_words(K),
    K = ceil(n/d) * D); scale: [N]; s1, s2: [n]; p1: [a, a], p2: [b, b] with a * b = n;
    lattice M: [d, D].

    A shard of the code columns (tensor-parallel row split): `words` holds the word columns
    [word_offset, word_offset + W) of rows that have `total_words` words in all; x is still
    the whole input (the lift needs all of it) and y is this shard's partial sum, so the
    shards' outputs add up to the whole layer's.
    """
    if x.dim() != 2 or x.shape[1] != s1.shape[0]:
        raise ValueError(f"liftq_linear: x must be [B, {s1.shape[0]}], got {tuple(x.shape)}")
    if total_words is not None and not 0 <= word_offset <= total_words - words.shape[1]:
        raise ValueError(
            f"liftq_linear: words [{words.shape[0]}, {words.shape[1]}] at word {word_offset} "
            f"do not fit rows of {total_words} words"
        )
    if x.shape[0] == 0:  # an expert no token was routed to in this batch
        return x.new_zeros((0, words.shape[0]))
    args = (x.contiguous(), words, scale, s1, p1, p2, s2, lattice, word_offset, total_words)
    if pick_backend(x, backend) == "triton":
        return triton_linear(*args)
    return torch_linear(*args)
