"""Triton kernels: y = x W^T for an int8 (per-row scale) or int4 (group-scaled) matrix W.

The lm_head of a packed model (`--lm-head int8|int4`, layout in `qlinear_ref`). One program
per (block of BLOCK_N outputs, row of x). Each step loads a [BLOCK_N, BLOCK_K] tile of codes,
widens it to float32 in registers and accumulates sum_k q[n, k] x[k]; int8 applies its row
scale once at the end, int4 takes one step per group (BLOCK_K = group) and scales each group's
partial sum. Codes are read once per row of x: a decode kernel (generation computes the logits
of the last position only). Launch sizes are fixed per dtype (no autotuning: a shape always
gets the same launch).

Reference: `qlinear_ref.qlinear_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.qlinear_ref import DEFAULT_GROUP, check_qlinear

BLOCK_N = 64
INT8_BLOCK_K = 64
NUM_WARPS = 8


@triton.jit
def _int8_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    # a 2-D accumulator reduced once after the loop: no warp shuffles inside it
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        q = tl.load(w_rows + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        x = tl.load(x_ptr + row * stride_x + rk, mask=k_ok, other=0.0).to(tl.float32)
        acc2 += q.to(tl.float32) * x[None, :]
    acc = tl.sum(acc2, axis=1)
    scale = tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + rn, (acc * scale).to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    W,
    G,
    stride_x,
    stride_w,
    stride_s,
    stride_y,
    BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    half: tl.constexpr = GROUP // 2
    w_rows = w_ptr + rn[:, None].to(tl.int64) * stride_w
    x_row = x_ptr + row * stride_x
    acc2 = tl.zeros([BLOCK_N, half], dtype=tl.float32)
    for g in range(0, G):
        rb = g * half + tl.arange(0, half)  # byte columns of this group
        packed = tl.load(w_rows + rb[None, :], mask=n_ok[:, None] & (rb[None, :] < W), other=0)
        packed = packed.to(tl.int32)
        low = ((packed & 15) - 8).to(tl.float32)
        high = ((packed >> 4) - 8).to(tl.float32)
        k_even = 2 * rb
        x_even = tl.load(x_row + k_even, mask=k_even < K, other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + k_even + 1, mask=k_even + 1 < K, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + rn.to(tl.int64) * stride_s + g, mask=n_ok, other=0.0)
        part = low * x_even[None, :] + high * x_odd[None, :]
        acc2 += part * scale.to(tl.float32)[:, None]
    acc = tl.sum(acc2, axis=1)
    tl.store(y_ptr + row * stride_y + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)


def _launch_qgemv(x, qweight, qscale, group, out_dtype, out):
    check_qlinear(x, qweight, qscale, group)
    n_out, k = qweight.shape[0], x.shape[1]
    if out is None:
        out = torch.empty(x.shape[0], n_out, dtype=out_dtype or x.dtype, device=x.device)
    elif tuple(out.shape) != (x.shape[0], n_out) or out.stride(1) != 1:
        raise ValueError(f"qlinear: out must be ({x.shape[0]}, {n_out}) with unit stride")
    if x.shape[0] == 0 or n_out == 0:
        return out
    grid = (triton.cdiv(n_out, BLOCK_N), x.shape[0])
    if qweight.dtype == torch.int8:
        _int8_gemv_kernel[grid](
            x, qweight, qscale, out, n_out, k, x.stride(0), qweight.stride(0), out.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_K=INT8_BLOCK_K, num_warps=NUM_WARPS,
        )  # fmt: skip
    else:
        _int4_gemv_kernel[grid](
            x, qweight, qscale, out, n_out, k, qweight.shape[1], qscale.shape[1],
            x.stride(0), qweight.stride(0), qscale.stride(0), out.stride(0),
            BLOCK_N=BLOCK_N, GROUP=group, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def qgemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qscale: torch.Tensor,
    group: int = DEFAULT_GROUP,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T with W stored as int8 or int4 (Triton).

    x: [B, K] float; qweight: int8 [N, K] with qscale [N] (per-row), or uint8 [N, ceil(K/2)]
    (two int4 codes per byte) with qscale [N, ceil(K/group)]; `group` a power of two.
    Accumulates in float32; returns y [B, N] in `out_dtype` (default x.dtype), written into
    `out` when given.
    """
    return _launch_qgemv(x, qweight, qscale, group, out_dtype, out)
