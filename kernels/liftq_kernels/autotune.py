"""Every tuning choice of the LiftQuant kernels, in one place.

* `DECODE_MAX_ROWS`: activations with at most this many rows (tokens) take the decode path
  (lift, then the bit-unpacking GEMV, one program per row and block of outputs); more rows take
  the prefill path (lift, then a tensor-core GEMM over unpacked sign tiles).
* `GEMV_CONFIGS` / `GEMM_CONFIGS`: the autotuner's candidates, keyed on the layer shape
  (N = out_features, K = packed sign bits per row; the GEMM also on a power-of-two bucket of
  the row count). Set `TRITON_PRINT_AUTOTUNING=1` to log the chosen config per shape.
* Under `TRITON_INTERPRET=1` (CPU tests) only the first, smallest config is tried: the
  interpreter is slow and the result is the same for every config.
* `LIFT_MAX_FACTOR`: the lift kernel keeps the padded Kronecker factors P1 (a x a) and
  P2 (b x b) in registers; layers with a larger factor lift through torch (still on the GPU).
* `LUT_MAX_ROWS`: the torch (CPU) path multiplies at most this many rows through byte lookup
  tables (256 partial sums per 8 code bits, then one gather per code byte) instead of
  unpacking every sign; above it, unpacking once per call is cheaper.

Importing this module does not import Triton (the torch path reads it too).
"""

from __future__ import annotations

import os
from typing import Any

DECODE_MAX_ROWS = 16
LUT_MAX_ROWS = 4
LIFT_MAX_FACTOR = 128
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_N, BLOCK_K, num_warps); BLOCK_K is a multiple of 32 (one word of sign bits).
_GEMV = [
    (16, 256, 4),
    (8, 512, 4),
    (32, 256, 4),
    (16, 512, 4),
    (32, 512, 8),
    (64, 256, 8),
    (64, 128, 4),
]
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GEMM = [
    (16, 32, 64, 4, 2),
    (64, 64, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
    (64, 64, 128, 4, 3),
]


def gemv_configs() -> list[Any]:
    import triton

    chosen = _GEMV[:1] if INTERPRET else _GEMV
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in chosen]


def gemm_configs() -> list[Any]:
    import triton

    chosen = _GEMM[:1] if INTERPRET else _GEMM
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for m, n, k, w, s in chosen
    ]


def lift_warps(a_padded: int, b_padded: int) -> int:
    """Warps of the lift kernel: enough threads that the padded factor tiles fit in registers."""
    tile = max(a_padded, b_padded) ** 2
    return 4 if tile <= 64 * 64 else 8


def row_bucket(rows: int) -> int:
    """Power-of-two bucket of the row count (the GEMM autotune key), capped at 4096."""
    return min(1 << (max(rows, 1) - 1).bit_length(), 4096)
