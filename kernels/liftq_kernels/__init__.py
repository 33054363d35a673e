"""LiftQuant kernels: lift activations, then multiply by bit-packed sign codes.

`liftq_linear` is the entry point (Triton on CUDA, torch on CPU); `reference` holds the float32
torch references and the bit layout; `lift`, `bitgemv`, `bitgemm` are the Triton ops (imported
lazily: Triton is optional); `autotune` holds every tuning choice.
"""

from liftq_kernels.ops import liftq_linear, pick_backend, triton_available
from liftq_kernels.reference import (
    bitmm_ref,
    lift_ref,
    liftq_linear_ref,
    pack_bits,
    unpack_bits,
    unpack_signs,
    words_per_row,
)

__all__ = [
    "bitmm_ref",
    "lift_ref",
    "liftq_linear",
    "liftq_linear_ref",
    "pack_bits",
    "pick_backend",
    "triton_available",
    "unpack_bits",
    "unpack_signs",
    "words_per_row",
]
