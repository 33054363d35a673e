"""Triton kernels: lift activations into the sign-code basis, z = blockdiag(M)^T T^-1 x.

Three launches, each spread over the whole GPU (a grid of tiles per activation row, so one
token still uses every SM), with no limit on the Kronecker factor sizes:

1. `_rotate_kernel`: Y = (X / s1) P2 with X = x.reshape(a, b): tiles of [BLOCK, BLOCK];
2. `_rotate_kernel`: U = P1^T Y / s2, and the largest |U| of every tile;
3. `_lattice_kernel`: z_j = M^T u_j for blocks of d-slices, scaled by 2^-e and stored as fp16
   (zero past K up to the padded row of the codes); 2^e (float32, one per row) is the
   smallest power of two with max|u| * max_t sum_j |M_jt| <= 2^11 * 2^e, which bounds every
   |z16| by 2^11 so the GEMV's fp16 partial sums cannot overflow (`reference.z_scale_ref`).

Products are float32 ("ieee": no TF32). Reference: `reference.lift_codes_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import LIFT_BLOCK, LIFT_SLICES, LIFT_WARPS

Z_BOUND_LOG2: tl.constexpr = tl.constexpr(11)


@triton.jit
def _rotate_kernel(
    a_ptr,
    a_div_ptr,
    b_ptr,
    c_ptr,
    c_div_ptr,
    amax_ptr,
    M,
    N,
    K,
    stride_a_row,
    stride_am,
    stride_ak,
    stride_b_row,
    stride_bk,
    stride_bn,
    stride_c_row,
    stride_amax,
    DIV_A: tl.constexpr,
    DIV_C: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """C[r] = A[r] @ B[r] for [M, K] x [K, N] tiles; A / a_div, C / c_div and a tile |C| max
    optional (a_div and c_div share the row-free index m * N + n of a row-major [M, N])."""
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    tiles_n = tl.cdiv(N, BLOCK)
    rm = (pid // tiles_n) * BLOCK + tl.arange(0, BLOCK)
    rn = (pid % tiles_n) * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        a_mask = (rm[:, None] < M) & (k0 + rk[None, :] < K)
        a_off = rm[:, None] * stride_am + (k0 + rk[None, :]) * stride_ak
        a = tl.load(a_ptr + row * stride_a_row + a_off, mask=a_mask, other=0.0).to(tl.float32)
        if DIV_A:
            a = a / tl.load(a_div_ptr + a_off, mask=a_mask, other=1.0).to(tl.float32)
        b_mask = (k0 + rk[:, None] < K) & (rn[None, :] < N)
        b_off = (k0 + rk[:, None]) * stride_bk + rn[None, :] * stride_bn
        b = tl.load(b_ptr + row * stride_b_row + b_off, mask=b_mask, other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_off = rm[:, None] * N + rn[None, :]
    if DIV_C:
        acc = acc / tl.load(c_div_ptr + c_off, mask=c_mask, other=1.0).to(tl.float32)
        tile_max = tl.max(tl.max(tl.where(c_mask, tl.abs(acc), 0.0), axis=1), axis=0)
        tl.store(amax_ptr + row * stride_amax + pid, tile_max)
    tl.store(c_ptr + row * stride_c_row + c_off, acc, mask=c_mask)


@triton.jit
def _lattice_kernel(
    u_ptr,
    amax_ptr,
    m_ptr,
    z_ptr,
    zs_ptr,
    n,
    n_slices,
    k_padded,
    tiles,
    stride_u,
    stride_amax,
    stride_z,
    D: tl.constexpr,
    d: tl.constexpr,
    BIG_D_P: tl.constexpr,
    SMALL_D_P: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    jd = tl.arange(0, SMALL_D_P)
    jD = tl.arange(0, BIG_D_P)
    m_mask = (jd[:, None] < d) & (jD[None, :] < D)
    m = tl.load(m_ptr + jd[:, None] * D + jD[None, :], mask=m_mask, other=0.0).to(tl.float32)
    gain = tl.max(tl.sum(tl.abs(m), axis=0), axis=0)
    u_max = 0.0
    for t0 in range(0, tiles, 64):
        t = t0 + tl.arange(0, 64)
        part = tl.load(amax_ptr + row * stride_amax + t, mask=t < tiles, other=0.0)
        u_max = tl.maximum(u_max, tl.max(part, axis=0))
    bound = tl.maximum(u_max * gain, 1e-30)
    e = tl.ceil(tl.log2(bound)).to(tl.int32) - Z_BOUND_LOG2
    e = tl.minimum(tl.maximum(e, -126), 126)
    inv_scale = ((127 - e) << 23).to(tl.float32, bitcast=True)  # exactly 2^-e

    s = pid * S_BLOCK + tl.arange(0, S_BLOCK)
    u_idx = s[:, None] * d + jd[None, :]
    u_mask = (jd[None, :] < d) & (u_idx < n)
    u = tl.load(u_ptr + row * stride_u + u_idx, mask=u_mask, other=0.0)
    zs = tl.dot(u, m, input_precision="ieee") * inv_scale
    z_idx = s[:, None] * D + jD[None, :]
    z_mask = (jD[None, :] < D) & (z_idx < k_padded)
    tl.store(z_ptr + row * stride_z + z_idx, zs.to(tl.float16), mask=z_mask)
    if pid == 0:
        tl.store(zs_ptr + row, ((127 + e) << 23).to(tl.float32, bitcast=True))


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def _check(x, s1, p1, p2, s2, lattice, k_padded):
    rows, n = x.shape
    a, b = p1.shape[0], p2.shape[0]
    if a * b != n:
        raise ValueError(f"lift: factors {a} x {b} do not multiply to in_features {n}")
    checks = (("s1", s1, (n,)), ("s2", s2, (n,)), ("p1", p1, (a, a)), ("p2", p2, (b, b)))
    for name, t, shape in checks:
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"lift: {name} must be contiguous {shape}, not {tuple(t.shape)}")
    d, big_d = lattice.shape
    if x.stride(1) != 1 or not lattice.is_contiguous():
        raise ValueError("lift: x rows and the lattice matrix must be contiguous")
    if k_padded < -(-n // d) * big_d or k_padded % 32:
        raise ValueError(f"lift: k_padded={k_padded} must be a multiple of 32 holding K bits")


def _launch_lift(x, s1, p1, p2, s2, lattice, k_padded, out):
    _check(x, s1, p1, p2, s2, lattice, k_padded)
    rows, n = x.shape
    a, b = p1.shape[0], p2.shape[0]
    d, big_d = lattice.shape
    if out is None:
        out = torch.empty(rows, k_padded, dtype=torch.float16, device=x.device)
    if tuple(out.shape) != (rows, k_padded) or out.stride(1) != 1 or out.dtype != torch.float16:
        raise ValueError(f"lift: out must be float16 ({rows}, {k_padded}) with unit stride")
    z_scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, z_scale
    y = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    u = torch.empty_like(y)
    tiles = triton.cdiv(a, LIFT_BLOCK) * triton.cdiv(b, LIFT_BLOCK)
    amax = torch.empty(rows, tiles, dtype=torch.float32, device=x.device)
    grid = (tiles, rows)
    common = {"BLOCK": LIFT_BLOCK, "num_warps": LIFT_WARPS}
    # Y = (X / s1) P2: A = X [a, b] (row r at x[r]), B = P2 shared by every row
    _rotate_kernel[grid](
        x, s1, p2, y, s2, amax, a, b, b,
        x.stride(0), b, 1, 0, b, 1, n, tiles, DIV_A=True, DIV_C=False, **common,
    )  # fmt: skip
    # U = P1^T Y / s2: A = P1^T (element (i, k) = P1[k, i]) shared, B = Y[r]
    _rotate_kernel[grid](
        p1, s1, y, u, s2, amax, a, b, a,
        0, 1, a, n, b, 1, n, tiles, DIV_A=False, DIV_C=True, **common,
    )  # fmt: skip
    slices = triton.cdiv(k_padded, big_d)  # past ceil(n / d): zero slices fill the padding
    _lattice_kernel[(triton.cdiv(slices, LIFT_SLICES), rows)](
        u, amax, lattice, out, z_scale, n, -(-n // d), k_padded, tiles,
        n, tiles, out.stride(0), D=big_d, d=d, BIG_D_P=_pad(big_d), SMALL_D_P=_pad(d),
        S_BLOCK=LIFT_SLICES, num_warps=LIFT_WARPS,
    )  # fmt: skip
    return out, z_scale


def lift(
    x: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    k_padded: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z16, z_scale) with z16 * z_scale[:, None] = blockdiag(M)^T T^-1 x (Triton).

    x: [B, n] float16/bfloat16/float32 with unit stride along n; s1, s2: [n]; p1: [a, a];
    p2: [b, b] with a * b = n, any sizes (float dtypes, contiguous); lattice M: [d, D].
    Returns z16 float16 [B, k_padded] (zero past ceil(n / d) * D; written into `out` when
    given) and z_scale float32 [B], a power of two per row with |z16| <= 2^11. Float32
    products; no host synchronisation (CUDA-graph safe).
    """
    return _launch_lift(x, s1, p1, p2, s2, lattice, k_padded, out)
