"""The int8 / int4 linear (a packed lm_head) as one call: Triton on CUDA, torch elsewhere.

    y = x W^T,   W = q * s   (layout: `qlinear_ref`)

`backend="auto"` picks the Triton kernel (`qlinear.qgemv`) for CUDA tensors and torch
otherwise, as `liftq_kernels.ops` does (`LIFTQ_BACKEND=torch|triton` overrides; `triton` on CPU
needs `TRITON_INTERPRET=1`). The torch path dequantizes `TORCH_CHUNK_ROWS` rows of W at a
time, so it never holds the whole matrix in float32.
"""

from __future__ import annotations

import torch

from liftq_kernels.ops import pick_backend
from liftq_kernels.qlinear_ref import DEFAULT_GROUP, check_qlinear, dequantize

TORCH_CHUNK_ROWS = 8192  # 8192 x 4096 float32 = 128 MiB of dequantized rows at most


def torch_qlinear(
    x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, group: int = DEFAULT_GROUP
) -> torch.Tensor:
    """Torch path: float32 products of row chunks of the dequantized W. Returns x.dtype."""
    xf = x.float()
    cols = x.shape[1]
    out = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, qweight.shape[0], TORCH_CHUNK_ROWS):
        rows = slice(start, start + TORCH_CHUNK_ROWS)
        w = dequantize(qweight[rows], qscale[rows], cols, group)
        out[:, rows] = (xf @ w.T).to(x.dtype)
    return out


def qlinear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qscale: torch.Tensor,
    group: int = DEFAULT_GROUP,
    backend: str = "auto",
) -> torch.Tensor:
    """x [B, K] -> y = x W^T [B, N] in x.dtype, W int8 or int4 (no bias).

    qweight: int8 [N, K] with qscale fp16 [N], or uint8 [N, ceil(K/2)] (two int4 codes per
    byte) with qscale fp16 [N, ceil(K/group)].
    """
    x = x.contiguous()
    check_qlinear(x, qweight, qscale, group)
    if pick_backend(x, backend) == "triton":
        from liftq_kernels.qlinear import qgemv

        return qgemv(x, qweight, qscale, group)
    return torch_qlinear(x, qweight, qscale, group)
