"""Triton kernel: decode-path 1-bit GEMV, y = diag(s) Q z for a few rows of z.

One program per (block of BLOCK_N outputs, row of z). Each step loads a [BLOCK_N, BLOCK_K/32]
tile of int32 code words, expands it in registers to [BLOCK_N, BLOCK_K] bits with shifts,
and accumulates sum_k (bit ? z_k : -z_k) in float32; the row scale is applied once at the
end. Codes are read once per row of z, so this path is for small batches (decode).

Reference: `reference.bitmm_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import gemv_configs


@triton.autotune(configs=gemv_configs(), key=["N", "K"])
@triton.jit
def _bitgemv_kernel(
    z_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    W,
    stride_z,
    stride_w,
    stride_y,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    words_per_step: tl.constexpr = BLOCK_K // 32
    shifts = tl.arange(0, 32)
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rw = k0 // 32 + tl.arange(0, words_per_step)
        words = tl.load(w_rows + rw[None, :], mask=n_ok[:, None] & (rw[None, :] < W), other=0)
        bits = (words[:, :, None] >> shifts[None, None, :]) & 1
        bits = tl.reshape(bits, [BLOCK_N, BLOCK_K])
        rk = k0 + tl.arange(0, BLOCK_K)
        z = tl.load(z_ptr + row * stride_z + rk, mask=rk < K, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(bits != 0, z[None, :], -z[None, :]), axis=1)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + rn, (acc * scale).to(y_ptr.dtype.element_ty), mask=n_ok)


def check_codes(z: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, op: str) -> None:
    """Shape, dtype and layout checks shared by the GEMV and GEMM launchers."""
    if z.dim() != 2 or words.dim() != 2 or scale.dim() != 1:
        raise ValueError(f"{op}: expects z [B, K], words [N, W], scale [N]")
    if words.dtype != torch.int32:
        raise ValueError(f"{op}: words must be int32, got {words.dtype}")
    k = z.shape[1]
    if words.shape[1] != -(-k // 32):
        raise ValueError(f"{op}: words has {words.shape[1]} columns, K={k} needs {-(-k // 32)}")
    if scale.shape[0] != words.shape[0]:
        raise ValueError(f"{op}: scale has {scale.shape[0]} rows, words {words.shape[0]}")
    if z.stride(1) != 1 or words.stride(1) != 1 or not scale.is_contiguous():
        raise ValueError(f"{op}: z, words and scale need unit stride along their last dim")


def _out(z, n_out, out_dtype, out):
    if out is None:
        return torch.empty(z.shape[0], n_out, dtype=out_dtype or z.dtype, device=z.device)
    if tuple(out.shape) != (z.shape[0], n_out) or out.stride(1) != 1:
        raise ValueError(f"out must be ({z.shape[0]}, {n_out}) with unit stride")
    return out


def _launch_bitgemv(z, words, scale, out_dtype, out):
    check_codes(z, words, scale, "bitgemv")
    n_out, k = words.shape[0], z.shape[1]
    y = _out(z, n_out, out_dtype, out)
    if z.shape[0] == 0 or n_out == 0:
        return y

    def grid(meta):
        return (triton.cdiv(n_out, meta["BLOCK_N"]), z.shape[0])

    _bitgemv_kernel[grid](
        z, words, scale, y, n_out, k, words.shape[1], z.stride(0), words.stride(0), y.stride(0)
    )
    return y


def bitgemv(
    z: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = (z @ Q^T) * s for a small batch (Triton, decode path).

    z: [B, K] float (K = n_slices * D); words: int32 [N, ceil(K/32)] sign bits (1 = +1, see
    `reference`); scale: [N] float. Accumulates in float32; returns y [B, N] in `out_dtype`
    (default z.dtype), written into `out` when given.
    """
    return _launch_bitgemv(z, words, scale, out_dtype, out)
