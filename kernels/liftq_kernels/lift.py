"""Triton kernel: lift activations into the sign-code basis, z = blockdiag(M)^T T^-1 x.

One program per row of x. Phase 1 keeps X = (x / s1).reshape(a, b) in registers and forms
u = vec(P1^T X P2) / s2 with two small dots (factors zero-padded to powers of two, at least
16); u goes to a float32 scratch row. Phase 2 reads u back as d-slices (zero past n) and
multiplies each block of slices by the padded lattice matrix M (d x D), writing z. The block
barrier between the phases makes the scratch writes of all threads visible.

Reference: `reference.lift_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from liftq_kernels.autotune import LIFT_MAX_FACTOR, lift_warps

SLICE_BLOCK = 32  # d-slices multiplied by M per step of phase 2


@triton.jit
def _lift_kernel(
    x_ptr,
    s1_ptr,
    p1_ptr,
    p2_ptr,
    s2_ptr,
    m_ptr,
    u_ptr,
    z_ptr,
    n,
    a,
    b,
    n_slices,
    stride_x,
    stride_u,
    stride_z,
    D: tl.constexpr,
    d: tl.constexpr,
    A_P: tl.constexpr,
    B_P: tl.constexpr,
    BIG_D_P: tl.constexpr,
    SMALL_D_P: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ia = tl.arange(0, A_P)
    ib = tl.arange(0, B_P)
    inside = (ia[:, None] < a) & (ib[None, :] < b)
    idx = ia[:, None] * b + ib[None, :]
    x = tl.load(x_ptr + row * stride_x + idx, mask=inside, other=0.0).to(tl.float32)
    s1 = tl.load(s1_ptr + idx, mask=inside, other=1.0).to(tl.float32)
    # p1t[i, j] = P1[j, i]
    p1_mask = (ia[:, None] < a) & (ia[None, :] < a)
    p1t = tl.load(p1_ptr + ia[None, :] * a + ia[:, None], mask=p1_mask, other=0.0).to(tl.float32)
    rotated = tl.dot(p1t, x / s1, input_precision="ieee")
    p2_mask = (ib[:, None] < b) & (ib[None, :] < b)
    p2 = tl.load(p2_ptr + ib[:, None] * b + ib[None, :], mask=p2_mask, other=0.0).to(tl.float32)
    rotated = tl.dot(rotated, p2, input_precision="ieee")
    s2 = tl.load(s2_ptr + idx, mask=inside, other=1.0).to(tl.float32)
    tl.store(u_ptr + row * stride_u + idx, rotated / s2, mask=inside)
    tl.debug_barrier()

    jd = tl.arange(0, SMALL_D_P)
    jD = tl.arange(0, BIG_D_P)
    m_mask = (jd[:, None] < d) & (jD[None, :] < D)
    m = tl.load(m_ptr + jd[:, None] * D + jD[None, :], mask=m_mask, other=0.0).to(tl.float32)
    for s0 in range(0, n_slices, S_BLOCK):
        s = s0 + tl.arange(0, S_BLOCK)
        u_idx = s[:, None] * d + jd[None, :]
        u = tl.load(u_ptr + row * stride_u + u_idx, mask=(jd[None, :] < d) & (u_idx < n), other=0.0)
        zs = tl.dot(u, m, input_precision="ieee")
        z_idx = s[:, None] * D + jD[None, :]
        z_mask = (s[:, None] < n_slices) & (jD[None, :] < D)
        tl.store(z_ptr + row * stride_z + z_idx, zs.to(z_ptr.dtype.element_ty), mask=z_mask)


def _pad(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def lift_supported(in_features: int, a: int, b: int) -> bool:
    """True when the lift kernel handles this factor pair (see `autotune.LIFT_MAX_FACTOR`)."""
    return a * b == in_features and max(a, b) <= LIFT_MAX_FACTOR


def _launch_lift(x, s1, p1, p2, s2, lattice, z_dtype, out):
    rows, n = x.shape
    a, b = p1.shape[0], p2.shape[0]
    d, big_d = lattice.shape
    if not lift_supported(n, a, b):
        raise ValueError(f"lift kernel: factors ({a}, {b}) of in_features {n} are not supported")
    for name, t, shape in (
        ("s1", s1, (n,)),
        ("s2", s2, (n,)),
        ("p1", p1, (a, a)),
        ("p2", p2, (b, b)),
    ):
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"lift: {name} must be contiguous {shape}, not {tuple(t.shape)}")
    if x.stride(1) != 1 or not lattice.is_contiguous():
        raise ValueError("lift kernel: x rows and the lattice matrix must be contiguous")
    n_slices = -(-n // d)
    if out is None:
        out = torch.empty(rows, n_slices * big_d, dtype=z_dtype, device=x.device)
    if tuple(out.shape) != (rows, n_slices * big_d) or out.stride(1) != 1:
        raise ValueError(f"lift kernel: out must be ({rows}, {n_slices * big_d}) with unit stride")
    scratch = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    a_p, b_p = _pad(a), _pad(b)
    _lift_kernel[(rows,)](
        x,
        s1,
        p1,
        p2,
        s2,
        lattice,
        scratch,
        out,
        n,
        a,
        b,
        n_slices,
        x.stride(0),
        scratch.stride(0),
        out.stride(0),
        D=big_d,
        d=d,
        A_P=a_p,
        B_P=b_p,
        BIG_D_P=_pad(big_d),
        SMALL_D_P=_pad(d),
        S_BLOCK=SLICE_BLOCK,
        num_warps=lift_warps(a_p, b_p),
    )
    return out


def lift(
    x: torch.Tensor,
    s1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    s2: torch.Tensor,
    lattice: torch.Tensor,
    z_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = blockdiag(M)^T T^-1 x on the device of x (Triton).

    x: [B, n] float16/bfloat16/float32 with unit stride along n; s1, s2: [n]; p1: [a, a];
    p2: [b, b] with a * b = n and a, b <= LIFT_MAX_FACTOR (any float dtype, contiguous);
    lattice M: [d, D]. Accumulates in float32. Returns z [B, ceil(n / d) * D] in `z_dtype`
    (written into `out` when given).
    """
    return _launch_lift(x, s1, p1, p2, s2, lattice, z_dtype, out)
