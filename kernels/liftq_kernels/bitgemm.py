"""Triton kernel: prefill-path 1-bit GEMM, y = diag(z_scale) z Q^T diag(s) for many rows.

Tiles of [BLOCK_M, BLOCK_K] fp16 activations meet [BLOCK_N, BLOCK_K/32] format-2 code words
that are expanded in registers to +-1 fp16 (exact), transposed and fed to `tl.dot` (tensor
cores) with a float32 accumulator; the activation tile is gathered in the codes' interleaved
order (bit p of a word = element 2p, bit p + 16 = element 2p + 1), so no reshuffle is needed.
The row scales multiply the finished tile. Program ids are grouped GROUP_M row-blocks at a
time so neighbouring programs share code tiles in L2. K is the stored row (32 W): z and the
codes are zero past the real K bits, so only the end of a row of an odd word count is masked.

Reference: `reference.bitmm_codes_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import gemm_configs, row_bucket
from liftq_kernels.bitgemv import check_codes, out_tensor


@triton.autotune(configs=gemm_configs(), key=["N", "K", "M_BUCKET"])
@triton.jit
def _bitgemm_kernel(
    z_ptr,
    zs_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_z,
    stride_w,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    words_per_step: tl.constexpr = BLOCK_K // 32
    shifts = tl.arange(0, 32)
    step = tl.arange(0, BLOCK_K)
    bit = step % 32
    # element of z that code bit (step // 32, bit) multiplies: the format-2 interleave
    element = (step // 32) * 32 + tl.where(bit < 16, 2 * bit, 2 * (bit - 16) + 1)
    z_rows = z_ptr + rm[:, None].to(tl.int64) * stride_z
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + element) < K  # a row of an odd number of words ends mid-step
        z = tl.load(z_rows + (k0 + element)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        rw = k0 // 32 + tl.arange(0, words_per_step)
        words = tl.load(w_rows + rw[None, :], mask=n_ok[:, None] & (rw[None, :] < K // 32), other=0)
        bits = (words[:, :, None] >> shifts[None, None, :]) & 1
        signs = (tl.reshape(bits, [BLOCK_N, BLOCK_K]) * 2 - 1).to(tl.float16)
        acc = tl.dot(z, tl.trans(signs), acc)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    z_scale = tl.load(zs_ptr + rm, mask=m_ok, other=0.0)
    y = (acc * scale[None, :] * z_scale[:, None]).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_y + rn[None, :]
    tl.store(y_ptrs, y, mask=m_ok[:, None] & n_ok[None, :])


def _launch_bitgemm(z, z_scale, words, scale, out_dtype, out):
    check_codes(z, z_scale, words, scale, "bitgemm")
    rows, k = z.shape
    n_out = words.shape[0]
    y = out_tensor(z, n_out, out_dtype, out)
    if rows == 0 or n_out == 0:
        return y

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _bitgemm_kernel[grid](
        z,
        z_scale,
        words,
        scale,
        y,
        rows,
        n_out,
        k,
        row_bucket(rows),
        z.stride(0),
        words.stride(0),
        y.stride(0),
    )
    return y


def bitgemm(
    z: torch.Tensor,
    z_scale: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = diag(z_scale) z Q^T diag(s) for a large batch (Triton, prefill path).

    z: fp16 [B, 32 W] from `lift`; z_scale: float32 [B]; words: int32 [N, W] format-2 codes;
    scale: [N] float. fp16 products on tensor cores, float32 accumulation; returns y [B, N] in
    `out_dtype`, written into `out` when given. Autotuned on (N, K, row bucket): warm each
    shape up before capturing a CUDA graph.
    """
    return _launch_bitgemm(z, z_scale, words, scale, out_dtype, out)
