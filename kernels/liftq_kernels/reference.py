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

The kernels compute from the *code layout* of packed format 2 (`pack_interleaved`): the same bits,
rows padded to a multiple of ROW_ALIGN_WORDS words (128-bit loads), and inside every word
the bits interleaved so that bits p and p + 16 hold elements 2p and 2p + 1 of the word's 32
entries of z. A shift by 15 - p then puts the signs of one (z[2p], z[2p+1]) pair on the two
fp16 sign bits of a 32-bit register (the GEMV's half2 trick). `pack_bits` (the plain
bitstream above) stays the layout of format 1 and of the work dir's codes.

The kernels' activation is fp16 with a power-of-two scale per row: `lift_codes_ref` returns
z16 = fp16(z / 2^e) and 2^e, with e the smallest integer for which the bound
max|u| * max_t sum_j |M_jt| <= 2^11 holds, so no sum of 32 entries of z16 can overflow fp16.

Everything here is plain torch and runs on any device; the Triton kernels in this package are
tested against these functions.
"""

from __future__ import annotations

import math

import torch

WORD_BITS = 32
ROW_ALIGN_WORDS = 4  # rows of format-2 codes of at least ALIGN_MIN_WORDS start on 16 bytes
ALIGN_MIN_WORDS = 256  # below it the padding would cost more than 1.2% of the codes
Z_BOUND_LOG2 = 11  # |z16| <= 2^11: 16 pair sums stay below 2^15 < 65504


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


def rotate_ref(
    x: torch.Tensor, s1: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, s2: torch.Tensor
) -> torch.Tensor:
    """u = T^-1 x = vec(P1^T X P2) / s2 with X = (x / s1).reshape(a, b), float32 [B, n]."""
    x = x.float()
    rows, n = x.shape
    shaped = (x / s1.float()).reshape(rows, p1.shape[0], p2.shape[0])
    return (p1.float().T @ shaped @ p2.float()).reshape(rows, n) / s2.float()


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
    return _slices(rotate_ref(x, s1, p1, p2, s2), lattice)


def _slices(u: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
    rows, n = u.shape
    d, big_d = lattice.shape
    slices = -(-n // d)
    padded = torch.zeros(rows, slices * d, dtype=torch.float32, device=u.device)
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
    """Float32 reference of the whole layer from format-2 codes: x [B, n] -> y [B, N]."""
    z = lift_ref(x, s1, p1, p2, s2, lattice)
    signs = unpack_interleaved(words, z.shape[1]).float() * 2 - 1
    return (z @ signs.T) * scale.float()


def padded_words(k_bits: int) -> int:
    """Words of one row of format-2 codes: ceil(K / 32), rounded up to a multiple of
    ROW_ALIGN_WORDS when it is at least ALIGN_MIN_WORDS."""
    w = words_per_row(k_bits)
    if w < ALIGN_MIN_WORDS:
        return w
    return -(-w // ROW_ALIGN_WORDS) * ROW_ALIGN_WORDS


def _interleave_index(device: torch.device) -> torch.Tensor:
    """position -> element: bit p holds element 2p (p < 16) or 2(p - 16) + 1 (p >= 16)."""
    p = torch.arange(WORD_BITS, device=device)
    return torch.where(p < 16, 2 * p, 2 * (p - 16) + 1)


def code_order(n_words: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [32 n_words]: the element of z that each bit of a format-2 row multiplies, so
    `z[:, code_order(W)]` turns z into the plain bitstream order of `pack_bits`."""
    base = torch.arange(n_words, device=device).unsqueeze(1) * WORD_BITS
    return (base + _interleave_index(torch.device(device))).reshape(-1)


def in_code_order(z: torch.Tensor, n_words: int) -> torch.Tensor:
    """z [B, K] zero-padded to the stored row (32 n_words) and permuted into `code_order`,
    so a plain-bitstream product (`bitmm_ref`, the byte tables) reads format-2 codes."""
    padded = torch.nn.functional.pad(z, (0, n_words * WORD_BITS - z.shape[1]))
    return padded[:, code_order(n_words, z.device)]


# (keep mask, moved mask, shift) of the four swap steps of a 32-bit perfect outer shuffle
# (Hacker's Delight 7-2): run forwards they interleave the halves (bit p -> 2p, bit p + 16 ->
# 2p + 1), backwards they unzip even and odd bits (the format-2 order).
_SHUFFLE_STEPS = (
    (0xFF0000FF, 0x0000FF00, 8),
    (0xF00FF00F, 0x00F000F0, 4),
    (0xC3C3C3C3, 0x0C0C0C0C, 2),
    (0x99999999, 0x22222222, 1),
)


def _swap_bits(words: torch.Tensor, steps) -> torch.Tensor:
    x = words.to(torch.int64) & 0xFFFFFFFF
    for keep, moved, shift in steps:
        x = (x & keep) | ((x << shift) & (moved << shift)) | ((x >> shift) & moved)
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def interleave_words(plain: torch.Tensor) -> torch.Tensor:
    """int32 words in `pack_bits` order -> the format-2 order (bit 2p -> p, 2p + 1 -> p + 16),
    rows padded with zero words to `padded_words`. Works on words (no
    bool expansion), so it costs 8 bytes of scratch per 32 code bits."""
    unzipped = _swap_bits(plain, reversed(_SHUFFLE_STEPS))
    pad = padded_words(plain.shape[1] * WORD_BITS) - plain.shape[1]
    return torch.nn.functional.pad(unzipped, (0, pad))


def plain_words(words: torch.Tensor) -> torch.Tensor:
    """Format-2 words -> `pack_bits` order (the padding words stay): inverse of the unzip."""
    return _swap_bits(words, _SHUFFLE_STEPS)


def pack_interleaved(bits: torch.Tensor) -> torch.Tensor:
    """bool [N, K] -> int32 [N, padded_words(K)] in the format-2 code layout."""
    return interleave_words(pack_bits(bits))


def unpack_interleaved(words: torch.Tensor, k_bits: int) -> torch.Tensor:
    """int32 [N, W] format-2 codes -> bool [N, k_bits]: inverse of `pack_interleaved`."""
    return unpack_bits(plain_words(words), k_bits)


def z_scale_ref(u_absmax: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
    """2^e per row (float32) with e the smallest integer giving max|z| bound <= 2^Z_BOUND_LOG2."""
    gain = lattice.float().abs().sum(0).max()
    bound = (u_absmax.float() * gain).clamp_min(2.0**-100)
    e = torch.ceil(torch.log2(bound) - Z_BOUND_LOG2).clamp(-126, 126)
    return torch.exp2(e)


def lift_codes_ref(
    x: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    k_padded: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z16, z_scale): the kernels' activation, fp16 [B, k_padded] (zero past K) and float32 [B].

    z16 * z_scale[:, None] equals `lift_ref(...)` up to the fp16 rounding of z16.
    """
    rows = x.shape[0]
    u = rotate_ref(x, s1, p1, p2, s2)
    scale = z_scale_ref(u.abs().amax(1), lattice)
    z = _slices(u, lattice)
    z16 = torch.zeros(rows, k_padded, dtype=torch.float16, device=x.device)
    z16[:, : z.shape[1]] = (z / scale[:, None]).half()
    return z16, scale


def bitmm_codes_ref(
    z16: torch.Tensor, z_scale: torch.Tensor, words: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """y = diag(z_scale) z16 Q^T diag(s) from format-2 codes, float32 [B, N]."""
    signs = unpack_interleaved(words, words.shape[1] * WORD_BITS).float() * 2 - 1
    return (z16.float() @ signs.T) * z_scale.float()[:, None] * scale.float()


def sylvester(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester's Hadamard matrix H (size a power of two) scaled to be orthonormal, float32."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def signed_hadamard(signs: torch.Tensor) -> torch.Tensor:
    """diag(signs) H / sqrt(size) (float32): the rotation `orthogonal_init` draws for a
    power-of-two size, rebuilt from its row signs (how packed format 2 stores it)."""
    return signs.float().unsqueeze(1) * sylvester(signs.numel(), signs.device)


def hadamard_signs(p: torch.Tensor, tolerance: float = 1e-3) -> torch.Tensor | None:
    """The row signs (int8, +-1) of a signed Hadamard factor p, or None when p is not one
    (within `tolerance` per entry, relative to 1 / sqrt(size))."""
    size = p.shape[0]
    if size & (size - 1) or p.shape != (size, size):
        return None
    signs = torch.where(p[:, 0] < 0, -1, 1).to(torch.int8)
    err = (signed_hadamard(signs).to(p.device) - p.float()).abs().max()
    return signs if float(err) * math.sqrt(size) <= tolerance else None
