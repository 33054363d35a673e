"""Triton kernel: decode-path 1-bit GEMV, y = diag(s) Q z for a few rows of z (format-2 codes).

Codes are int32 [N, W] in the format-2 layout (`reference.pack_interleaved`: long rows padded to
16 bytes, bits p and p + 16 of a word = elements 2p and 2p + 1), z is fp16 [B, 32 W] with a
power-of-two scale per row (`lift`). One program owns BLOCK_N output rows and one K range
(split-K: ranges of WORDS_PER_SPLIT words, so small layers still fill every SM); each step
loads one 128-bit vector of 4 code words per row and, for every row of z, turns each word
into its signed sum with 16 x (shift, LOP3, HADD2): the shift puts bits p and p + 16 on the
sign bits of an fp16 pair, LOP3 flips the signs of (z[2p], z[2p+1]) where the code is 0, and
HADD2 adds the pair into an fp16x2 partial sum of the word (at most 16 terms of |z| <= 2^11,
so it cannot overflow), which then joins a float32 tile accumulator reduced once after the
loop. That is 1.5 instructions per code bit plus the loads. Under TRITON_INTERPRET=1 the same
sums are formed in fp16 with torch-visible ops, in the same order (bit-identical results).

With one split the program scales and stores y; with several it stores float32 partial sums
and `_reduce_kernel` adds them, scales and casts. Reference: `reference.bitmm_codes_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import INTERPRET, gemv_plan


def _pair_sum_asm() -> str:
    """PTX of one code word against 16 fp16 pairs of z: $0 = float32 sum, $1 word, $2.. pairs."""
    lines = ["{", ".reg .b32 t, s, m;", ".reg .b16 lo, hi;", ".reg .f32 flo, fhi;"]
    lines.append("mov.b32 m, 0x80008000;")
    for p in range(16):
        lines.append(f"shl.b32 t, $1, {15 - p};")
        # (~t & m) ^ pair: flip the sign of each half whose code bit is 0 (0xA6 = ~a & b ^ c)
        target = "s" if p == 0 else "t"
        lines.append(f"lop3.b32 {target}, t, m, ${2 + p}, 0xA6;")
        if p:
            lines.append("add.rn.f16x2 s, s, t;")
    lines += ["mov.b32 {lo, hi}, s;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;"]
    lines += ["add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


PAIR_SUM_ASM = tl.constexpr(_pair_sum_asm())


@triton.jit
def _signed_half(word, z_ptr, z_ok, p: tl.constexpr, hi: tl.constexpr):
    """Element 2p + hi of a word's 32 z entries, negated where its code bit is 0 (fp16)."""
    z = tl.load(z_ptr + 2 * p + hi, mask=z_ok, other=0.0)
    bit = (word >> (p + 16 * hi)) & 1
    return tl.where(bit != 0, z, -z)


@triton.jit
def _word_sum_emulated(word, z_ptr, z_ok):
    """The asm's result with plain ops: fp16 sums of the 16 pairs in order, then f32(lo + hi)."""
    lo = _signed_half(word, z_ptr, z_ok, 0, 0)
    hi = _signed_half(word, z_ptr, z_ok, 0, 1)
    for p in tl.static_range(1, 16):
        lo = lo + _signed_half(word, z_ptr, z_ok, p, 0)
        hi = hi + _signed_half(word, z_ptr, z_ok, p, 1)
    return lo.to(tl.float32) + hi.to(tl.float32)


@triton.jit
def _word_sum(word, z_ptr, z_ok, EMULATE: tl.constexpr):
    """Signed sum of the 32 z entries of each code word (float32), z_ptr -> its first fp16.
    Where z_ok is false z reads as zero, so the word adds nothing whatever its bits."""
    if EMULATE:
        return _word_sum_emulated(word, z_ptr, z_ok)
    else:
        pairs = z_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        return tl.inline_asm_elementwise(
            PAIR_SUM_ASM,
            "=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [
                word,
                tl.load(pairs + 0, mask=z_ok, other=0),
                tl.load(pairs + 1, mask=z_ok, other=0),
                tl.load(pairs + 2, mask=z_ok, other=0),
                tl.load(pairs + 3, mask=z_ok, other=0),
                tl.load(pairs + 4, mask=z_ok, other=0),
                tl.load(pairs + 5, mask=z_ok, other=0),
                tl.load(pairs + 6, mask=z_ok, other=0),
                tl.load(pairs + 7, mask=z_ok, other=0),
                tl.load(pairs + 8, mask=z_ok, other=0),
                tl.load(pairs + 9, mask=z_ok, other=0),
                tl.load(pairs + 10, mask=z_ok, other=0),
                tl.load(pairs + 11, mask=z_ok, other=0),
                tl.load(pairs + 12, mask=z_ok, other=0),
                tl.load(pairs + 13, mask=z_ok, other=0),
                tl.load(pairs + 14, mask=z_ok, other=0),
                tl.load(pairs + 15, mask=z_ok, other=0),
            ],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )


@triton.jit
def _bitgemv_kernel(
    z_ptr,
    zs_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    B,
    N,
    W,
    stride_z,
    stride_w,
    stride_y,
    WORDS_PER_SPLIT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ALIGNED: tl.constexpr,
    FINAL: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rb = tl.arange(0, ROWS)
    b_ok = rb < B
    lane = tl.arange(0, BLOCK_W)
    if ALIGNED:  # 16-byte rows (format 2 pads long rows): vector loads of 4 words
        stride_w = tl.multiple_of(stride_w, 4)
    # int32 offsets: codes of one layer stay below 2^31 words (8 GiB)
    w_offsets = rn[:, None] * stride_w + lane[None, :]
    z_rows = z_ptr + tl.where(b_ok, rb, 0)[:, None, None] * stride_z + 32 * lane[None, None, :]
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_W], dtype=tl.float32)
    first = split * WORDS_PER_SPLIT
    last = tl.minimum(first + WORDS_PER_SPLIT, W)
    for w0 in range(first, last, BLOCK_W):
        lane_ok = w0 + lane < last  # the last step of the last range may pass the row's end
        w_ok = n_ok[:, None] & lane_ok[None, :]
        words = tl.load(w_ptr + (w_offsets + w0), mask=w_ok, other=0, cache_modifier=".cg")
        z_ok = lane_ok[None, None, :]
        acc += _word_sum(words[None, :, :], z_rows + 32 * w0, z_ok, EMULATE)
    total = tl.sum(acc, axis=2)
    out = y_ptr + rb[:, None].to(tl.int64) * stride_y + rn[None, :]
    mask = b_ok[:, None] & n_ok[None, :]
    if FINAL:
        scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        z_scale = tl.load(zs_ptr + rb, mask=b_ok, other=0.0)
        y = total * scale[None, :] * z_scale[:, None]
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out + split.to(tl.int64) * B * stride_y, total, mask=mask)


@triton.jit
def _reduce_kernel(part_ptr, zs_ptr, s_ptr, y_ptr, B, N, SPLITS, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n_ok = rn < N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(0, SPLITS):
        total += tl.load(part_ptr + (split * B + row) * N + rn, mask=n_ok, other=0.0)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = total * scale * tl.load(zs_ptr + row)
    tl.store(y_ptr + row * stride_y + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


REDUCE_BLOCK = 256


def check_codes(z, z_scale, words, scale, op: str) -> None:
    """Shape, dtype and layout checks shared by the GEMV and GEMM launchers."""
    if z.dim() != 2 or words.dim() != 2 or scale.dim() != 1 or z_scale.dim() != 1:
        raise ValueError(f"{op}: expects z [B, K], z_scale [B], words [N, W], scale [N]")
    if words.dtype != torch.int32 or z.dtype != torch.float16:
        raise ValueError(f"{op}: words must be int32 and z float16, got {words.dtype}, {z.dtype}")
    if z.shape[1] != 32 * words.shape[1]:
        raise ValueError(
            f"{op}: words [N, {words.shape[1]}] need z with 32 x as many columns "
            f"({z.shape[1]} given): use format-2 codes (reference.pack_interleaved) and `lift`"
        )
    if scale.shape[0] != words.shape[0] or z_scale.shape[0] != z.shape[0]:
        raise ValueError(f"{op}: scale has {scale.shape[0]} rows, words {words.shape[0]}")
    if z.stride(1) != 1 or words.stride(1) != 1:
        raise ValueError(f"{op}: z and words need unit stride along K")
    if not (scale.is_contiguous() and z_scale.is_contiguous()):
        raise ValueError(f"{op}: scale and z_scale must be contiguous")


def out_tensor(z, n_out, out_dtype, out):
    if out is None:
        return torch.empty(z.shape[0], n_out, dtype=out_dtype, device=z.device)
    if tuple(out.shape) != (z.shape[0], n_out) or out.stride(1) != 1:
        raise ValueError(f"out must be ({z.shape[0]}, {n_out}) with unit stride")
    return out


def _launch_bitgemv(z, z_scale, words, scale, out_dtype, out):
    check_codes(z, z_scale, words, scale, "bitgemv")
    rows, (n_out, n_words) = z.shape[0], words.shape
    y = out_tensor(z, n_out, out_dtype, out)
    if rows == 0 or n_out == 0:
        return y
    plan = gemv_plan(rows, n_out, n_words)
    grid = (triton.cdiv(n_out, plan.block_n), plan.splits)
    final = plan.splits == 1
    target = y if final else torch.empty(plan.splits, rows, n_out, device=z.device)
    _bitgemv_kernel[grid](
        z,
        z_scale,
        words,
        scale,
        target,
        rows,
        n_out,
        n_words,
        z.stride(0),
        words.stride(0),
        y.stride(0) if final else n_out,
        WORDS_PER_SPLIT=plan.words_per_split,
        ROWS=plan.rows,
        BLOCK_N=plan.block_n,
        BLOCK_W=plan.block_w,
        ALIGNED=words.stride(0) % 4 == 0 and words.data_ptr() % 16 == 0,
        FINAL=final,
        EMULATE=INTERPRET,
        num_warps=plan.num_warps,
    )
    if not final:
        reduce_grid = (triton.cdiv(n_out, REDUCE_BLOCK), rows)
        _reduce_kernel[reduce_grid](
            target, z_scale, scale, y, rows, n_out, plan.splits, y.stride(0), BLOCK=REDUCE_BLOCK
        )
    return y


def bitgemv(
    z: torch.Tensor,
    z_scale: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = diag(z_scale) z Q^T diag(s) for a small batch (Triton, decode path).

    z: fp16 [B, 32 W] (zero past K, |z| <= 2^11: see `lift`); z_scale: float32 [B];
    words: int32 [N, W] format-2 codes; scale: [N] float. Accumulates in
    fp16 within a word and float32 across words; returns y [B, N] in `out_dtype`, written
    into `out` when given. No host synchronisation (CUDA-graph safe).
    """
    return _launch_bitgemv(z, z_scale, words, scale, out_dtype, out)
