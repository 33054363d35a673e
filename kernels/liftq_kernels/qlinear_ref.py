"""Integer embedding / lm_head matrices: their layout, round-to-nearest quantizers and the
float32 torch references of the kernels in `qlinear.py`.

A matrix W [N, K] (vocab x hidden for an embedding or an lm_head) is stored symmetrically:

* int8: `qweight` int8 [N, K] with q = round(W / s) in [-127, 127] and one fp16 scale per row,
  `qscale` [N], s = max_k |W[n, k]| / 127;
* int4: groups of `group` consecutive columns of a row (the last one may be short) share an
  fp16 scale, `qscale` [N, ceil(K / group)], s = max |W[n, group]| / 7, q in [-7, 7].
  `qweight` uint8 [N, ceil(K / 2)] holds two columns per byte, column 2j in the low nibble and
  column 2j + 1 in the high one, each as q + 8 (offset binary, 1 .. 15); an odd K pads the last
  high nibble with 8 (q = 0).

W ~ q * s. The scale is rounded to fp16 before q is computed, so q matches the stored scale. An
all-zero row (or group) gets s = 0 and q = 0. Everything here is plain torch on any device.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
INT4_MAX = 7
INT4_OFFSET = 8
DEFAULT_GROUP = 128


def check_qlinear(x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, group: int) -> None:
    """Shape, dtype and layout checks shared by the Triton launcher and the torch path."""
    if x.dim() != 2 or qweight.dim() != 2:
        raise ValueError(f"qlinear: expects x [B, K] and qweight [N, *], got {tuple(x.shape)}")
    n_out, k = qweight.shape[0], x.shape[1]
    if qweight.dtype == torch.int8:
        if qweight.shape[1] != k or tuple(qscale.shape) != (n_out,):
            raise ValueError(
                f"qlinear int8: qweight {tuple(qweight.shape)} and qscale {tuple(qscale.shape)} "
                f"need [N, {k}] and [N]"
            )
    elif qweight.dtype == torch.uint8:
        if group < 2 or group & (group - 1):
            raise ValueError(f"qlinear int4: group {group} must be a power of two >= 2")
        groups = -(-k // group)
        if qweight.shape[1] != -(-k // 2) or tuple(qscale.shape) != (n_out, groups):
            raise ValueError(
                f"qlinear int4: qweight {tuple(qweight.shape)} and qscale {tuple(qscale.shape)} "
                f"need [N, {-(-k // 2)}] and [N, {groups}] for K={k}, group {group}"
            )
    else:
        raise ValueError(f"qlinear: qweight must be int8 or uint8, got {qweight.dtype}")
    if x.stride(1) != 1 or qweight.stride(1) != 1 or qscale.stride(-1) != 1:
        raise ValueError("qlinear: x, qweight and qscale need unit stride along their last dim")


def _codes(w: torch.Tensor, amax: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = round(w / s) clamped to [-top, top] with s = fp16(amax / top) broadcast over w."""
    scale = (amax / top).to(torch.float16)
    s = scale.float()
    q = torch.round(w / torch.where(s > 0, s, torch.ones_like(s))).clamp(-top, top)
    return torch.where(s > 0, q, torch.zeros_like(q)), scale


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (qweight int8 [N, K], qscale fp16 [N]) (see the module doc)."""
    w = weight.float()
    q, scale = _codes(w, w.abs().amax(dim=1, keepdim=True), INT8_MAX)
    return q.to(torch.int8).contiguous(), scale.reshape(-1).contiguous()


def quantize_int4(
    weight: torch.Tensor, group: int = DEFAULT_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (qweight uint8 [N, ceil(K/2)], qscale fp16 [N, ceil(K/group)])."""
    rows, cols = weight.shape
    groups = -(-cols // group)
    w = torch.zeros(rows, groups * group, dtype=torch.float32, device=weight.device)
    w[:, :cols] = weight.float()
    w = w.view(rows, groups, group)
    q, scale = _codes(w, w.abs().amax(dim=2, keepdim=True), INT4_MAX)
    nibbles = (q.view(rows, -1)[:, :cols] + INT4_OFFSET).to(torch.uint8)
    if cols % 2:
        pad = torch.full((rows, 1), INT4_OFFSET, dtype=torch.uint8, device=weight.device)
        nibbles = torch.cat([nibbles, pad], dim=1)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.contiguous(), scale.view(rows, groups).contiguous()


def unpack_int4(qweight: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [N, ceil(cols/2)] -> the signed codes q, int8 [N, cols]."""
    low = (qweight & 15).to(torch.int8) - INT4_OFFSET
    high = (qweight >> 4).to(torch.int8) - INT4_OFFSET
    return torch.stack([low, high], dim=2).reshape(qweight.shape[0], -1)[:, :cols]


def dequantize(
    qweight: torch.Tensor, qscale: torch.Tensor, cols: int, group: int = DEFAULT_GROUP
) -> torch.Tensor:
    """The matrix q * s as float32 [N, cols], for int8 (`qweight` int8) or int4 (uint8).

    Works on any subset of rows (e.g. `qweight[ids], qscale[ids]` for an embedding lookup).
    """
    if qweight.dtype == torch.int8:
        return qweight.float() * qscale.float().reshape(-1, 1)
    if qweight.dtype == torch.uint8:
        scale = qscale.float().repeat_interleave(group, dim=1)[:, :cols]
        return unpack_int4(qweight, cols).float() * scale
    raise ValueError(f"dequantize: qweight must be int8 or uint8, got {qweight.dtype}")


def qlinear_ref(
    x: torch.Tensor, qweight: torch.Tensor, qscale: torch.Tensor, group: int = DEFAULT_GROUP
) -> torch.Tensor:
    """y = x W^T in float32 with W = `dequantize(qweight, qscale)`.

    x: [B, K] float; qweight int8 [N, K] with qscale [N], or uint8 [N, ceil(K/2)] with qscale
    [N, ceil(K/group)]. Returns float32 [B, N].
    """
    return x.float() @ dequantize(qweight, qscale, x.shape[1], group).T
