"""Float32 torch references of the LiftQuant kernels, and the bit layout they decode.

A quantized linear (out_features N, in_features n, lattice LQ-D/d) computes

    y = diag(s) Q z,        z = lift(x) = blockdiag(M)^T T^-1 x

* `T^-1 x = diag(1/s2) (P1 kron P2)^T diag(1/s1) x`: with X = (x / s1).reshape(a, b),
  u = vec(P1^T X P2) / s2 (the inverse whitening, `quant.whitening.lift_activation`);
* u is zero-padded to n_slices * d (n_slices = ceil(n / d)) and every d-slice u_j maps to
  z_j = M^T u_j (D values): z has K = n_slices * D entries;
* Q in {-1, +1}^(N x K) is stored as bits, 1 = +1: row r's K bits are a little-endian
  bitstream of 32-bit words, bit k in word k // 32 at position k % 32; the row is padded to
  W = ceil(K / 32) words with zero bits. Words are int32 (two's complement, bit 31 = sign).

Everything here is plain torch and runs on any device; the Triton kernels in this package are
tested against these functions.
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def words_per_row(k_bits: int) -> int:
    """32-bit words that hold `k_bits` sign bits of one row."""
    return -(-k_bits // WORD_BITS)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> int32 [N, ceil(K/32)] in the layout above (zero-padded tail)."""
    if bits.dim() != 2:
        raise ValueError(f"pack_bits expects a 2-D bool tensor, got shape {tuple(bits.shape)}")
    n, k = bits.shape
    w = words_per_row(k)
    padded = torch.zeros(n, w * WORD_BITS, dtype=torch.int64, device=bits.device)
    padded[:, :k] = bits.to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=bits.device) << torch.arange(
        WORD_BITS, device=bits.device
    )
    words = (padded.view(n, w, WORD_BITS) * weights).sum(-1)
    # Values >= 2**31 wrap to negative int32: the bit pattern is what matters.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_bits(words: torch.Tensor, k_bits: int) -> torch.Tensor:
    """int32 [N, W] -> bool [N, k_bits]: inverse of `pack_bits`."""
    shifts = torch.arange(WORD_BITS, dtype=torch.int32, device=words.device)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :k_bits].bool()


def unpack_signs(words: torch.Tensor, k_bits: int, dtype: torch.dtype = torch.float32):
    """int32 [N, W] -> {-1, +1} [N, k_bits] in `dtype`."""
    return unpack_bits(words, k_bits).to(dtype) * 2 - 1


def lift_ref(
    x: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
) -> torch.Tensor:
    """z = blockdiag(M)^T T^-1 x in float32.

    x: [B, n] any float dtype; s1, s2: [n]; p1: [a, a]; p2: [b, b] (a * b = n);
    lattice M: [d, D]. Returns float32 [B, ceil(n / d) * D].
    """
    x = x.float()
    rows, n = x.shape
    a, b = p1.shape[0], p2.shape[0]
    d, big_d = lattice.shape
    shaped = (x / s1.float()).reshape(rows, a, b)
    u = (p1.float().T @ shaped @ p2.float()).reshape(rows, n) / s2.float()
    slices = -(-n // d)
    padded = torch.zeros(rows, slices * d, dtype=torch.float32, device=x.device)
    padded[:, :n] = u
    return (padded.view(rows, slices, d) @ lattice.float()).reshape(rows, slices * big_d)


def bitmm_ref(z: torch.Tensor, words: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = diag(s) Q z for every row of z, in float32.

    z: [B, K] float; words: int32 [N, ceil(K/32)]; scale: [N]. Returns float32 [B, N].
    """
    signs = unpack_signs(words, z.shape[1])
    return (z.float() @ signs.T) * scale.float()


def liftq_linear_ref(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
) -> torch.Tensor:
    """Float32 reference of the whole layer: x [B, n] -> y [B, N]."""
    return bitmm_ref(lift_ref(x, s1, p1, p2, s2, lattice), words, scale)
