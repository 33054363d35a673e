"""Triton kernel: prefill-path 1-bit GEMM, y = (z @ Q^T) * s for many rows of z.

Tiles of [BLOCK_M, BLOCK_K] activations meet [BLOCK_N, BLOCK_K/32] code words that are
expanded in registers to +-1 in the activation dtype (exact in every float format), transposed
and fed to `tl.dot` with a float32 accumulator; the row scale multiplies the finished tile.
Program ids are grouped GROUP_M row-blocks at a time so neighbouring programs share code
tiles in L2. Float32 activations use IEEE (not TF32) products so the result tracks the
reference.

Reference: `reference.bitmm_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import gemm_configs, row_bucket
from liftq_kernels.bitgemv import _out, check_codes


@triton.autotune(configs=gemm_configs(), key=["N", "K", "M_BUCKET"])
@triton.jit
def _bitgemm_kernel(
    z_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    W,
    M_BUCKET,
    stride_z,
    stride_w,
    stride_y,
    IEEE: tl.constexpr,
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
    z_rows = z_ptr + rm[:, None].to(tl.int64) * stride_z
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        z = tl.load(z_rows + rk[None, :], mask=m_ok[:, None] & (rk[None, :] < K), other=0.0)
        rw = k0 // 32 + tl.arange(0, words_per_step)
        words = tl.load(w_rows + rw[None, :], mask=n_ok[:, None] & (rw[None, :] < W), other=0)
        bits = (words[:, :, None] >> shifts[None, None, :]) & 1
        signs = (tl.reshape(bits, [BLOCK_N, BLOCK_K]) * 2 - 1).to(z.dtype)
        if IEEE:
            acc = tl.dot(z, tl.trans(signs), acc, input_precision="ieee")
        else:
            acc = tl.dot(z, tl.trans(signs), acc)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    y = (acc * scale[None, :]).to(y_ptr.dtype.element_ty)
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_y + rn[None, :]
    tl.store(y_ptrs, y, mask=m_ok[:, None] & n_ok[None, :])


def _launch_bitgemm(z, words, scale, out_dtype, out):
    check_codes(z, words, scale, "bitgemm")
    rows, k = z.shape
    n_out = words.shape[0]
    y = _out(z, n_out, out_dtype, out)
    if rows == 0 or n_out == 0:
        return y

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(n_out, meta["BLOCK_N"]),)

    _bitgemm_kernel[grid](
        z,
        words,
        scale,
        y,
        rows,
        n_out,
        k,
        words.shape[1],
        row_bucket(rows),
        z.stride(0),
        words.stride(0),
        y.stride(0),
        IEEE=z.dtype == torch.float32,
    )
    return y


def bitgemm(
    z: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (z @ Q^T) * s for a large batch (Triton, prefill path).

    z: [B, K] float16/bfloat16/float32 (K = n_slices * D); words: int32 [N, ceil(K/32)];
    scale: [N] float. Products in z's dtype (float32: IEEE), float32 accumulation; returns
    y [B, N] in `out_dtype` (default z.dtype), written into `out` when given.
    """
    return _launch_bitgemm(z, words, scale, out_dtype, out)
