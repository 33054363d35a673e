"""Every tuning choice of the LiftQuant kernels, in one place.

* `DECODE_MAX_ROWS`: activations with at most this many rows (tokens) take the decode path
  (lift, then the 1-bit GEMV, which reads the codes once for all rows); more rows take the
  prefill path (lift, then a tensor-core GEMM over unpacked sign tiles). Above 4 rows the
  GEMV's 1.4 instructions per code bit and row cost more than the GEMM.
* `GEMV_CONFIGS` and `gemv_plan`: the GEMV launch is a pure function of the shape (no
  autotuning, so a captured CUDA graph replays the same kernels); each config's static figures
  are in bench/results/kernel_static.md.
* `GEMM_SHAPES`: the prefill GEMM's autotuner candidates, keyed on (N, K, power-of-two row
  bucket); set `TRITON_PRINT_AUTOTUNING=1` to log the chosen config per shape. Configs that
  spilled on sm_80/89/90 (bench/kernel_static.py) were dropped.
* `LIFT_BLOCK`, `LIFT_SLICES`, `LIFT_WARPS`: tile sizes of the three lift launches (any
  factor size: the rotations loop over tiles).
* Under `TRITON_INTERPRET=1` (CPU tests) only the smallest configs run: the interpreter is
  slow and the result does not depend on the config.
* `LUT_MAX_ROWS`: the torch (CPU) path multiplies at most this many rows through byte lookup
  tables (256 partial sums per 8 code bits, then one gather per code byte) instead of
  unpacking every sign; above it, unpacking once per call is cheaper.

Importing this module does not import Triton (the torch path reads it too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

DECODE_MAX_ROWS = 4
LUT_MAX_ROWS = 4
LIFT_BLOCK = 32  # tile edge of the two rotation products
LIFT_SLICES = 32  # d-slices per program of the lattice product
LIFT_WARPS = 4
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
GEMM_SHAPES = [
    (16, 32, 64, 4, 2),
    (64, 64, 64, 4, 3),
    (64, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 4),
]


def gemm_configs() -> list[Any]:
    import triton

    chosen = GEMM_SHAPES[:1] if INTERPRET else GEMM_SHAPES
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s
        )
        for m, n, k, w, s in chosen
    ]


def row_bucket(rows: int) -> int:
    """Power-of-two bucket of the row count (the GEMM autotune key), capped at 4096."""
    return min(1 << (max(rows, 1) - 1).bit_length(), 4096)


# Decode GEMV launch configs, (BLOCK_N, num_warps, BLOCK_W) per padded batch size, largest
# first; every config is compiled and read as SASS by bench/kernel_static.py. BLOCK_W code
# words per row and step (8 = one 32-byte sector); each thread reuses the z pairs it loads for
# all its rows, so more rows per thread means fewer loads per code bit. Static sm_90 figures
# (instructions per code bit, registers): batch 1 (512, 4, 8) 1.79 / 165, (128, 4, 4)
# 2.05 / 40; batch 2 (256, 4, 8) 2.99 / 128; batch 4 (128, 4, 4) 5.69 / 126. Above batch 4
# the tensor-core GEMM is cheaper than 1.4 instructions per bit and row.
GEMV_CONFIGS = {
    1: [(512, 4, 8), (256, 4, 8), (128, 4, 8), (128, 4, 4)],
    2: [(256, 4, 8), (128, 4, 4)],
    4: [(128, 4, 4)],
}
GEMV_TARGET_PROGRAMS = 528  # 4 programs per SM of a 132-SM GPU: enough to stream at full bandwidth
GEMV_MIN_SPLIT_WORDS = 16  # a K range of at least 512 code bits per program


@dataclass(frozen=True)
class GemvPlan:
    """Launch shape of one decode GEMV (pure function of the layer shape and batch)."""

    rows: int  # ROWS: batch rows padded to a power of two
    block_n: int
    num_warps: int
    block_w: int
    splits: int  # K ranges (split-K); 1 = the GEMV stores y itself
    words_per_split: int  # a multiple of block_w


def gemv_plan(batch: int, n_out: int, n_words: int) -> GemvPlan:
    """The GEMV launch for `batch` (<= DECODE_MAX_ROWS) rows of z against [n_out, n_words] codes.

    The first config of the batch's list (largest BLOCK_N first) whose grid reaches
    GEMV_TARGET_PROGRAMS with K ranges of at least GEMV_MIN_SPLIT_WORDS words; if none does,
    the config with the most programs. Splits: just enough for the target. No device query
    and no autotuning: a shape always gets the same launch (CUDA-graph safe, reproducible).
    """
    rows = 1 << (max(batch, 1) - 1).bit_length()
    if rows > DECODE_MAX_ROWS:
        raise ValueError(f"gemv_plan: batch {batch} is above DECODE_MAX_ROWS={DECODE_MAX_ROWS}")
    configs = GEMV_CONFIGS[rows]
    if INTERPRET:  # small, and 8 words a step: rows of 4 (mod 8) words test the ragged end
        configs = [(16, 1, 8)]
    max_splits = max(1, n_words // GEMV_MIN_SPLIT_WORDS)

    def programs(config: tuple[int, int, int]) -> int:
        return -(-n_out // config[0]) * max_splits

    reaching = [c for c in configs if programs(c) >= GEMV_TARGET_PROGRAMS]
    block_n, warps, block_w = reaching[0] if reaching else max(configs, key=programs)
    splits = min(max_splits, -(-GEMV_TARGET_PROGRAMS // -(-n_out // block_n)))
    per_split = -(-n_words // splits)
    per_split = -(-per_split // block_w) * block_w
    splits = -(-n_words // per_split)
    return GemvPlan(rows, block_n, warps, block_w, splits, per_split)
