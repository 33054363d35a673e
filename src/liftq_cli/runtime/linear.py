"""`LiftQuantLinear`: a linear layer that computes from the packed format.

    y = diag(s) Q (blockdiag(M)^T T^-1 x) + bias

Buffers are exactly the tensors `io.packed_format.linear_tensors` lists for the file's format
version (int32 sign words, fp16 scales and whitening factors, int8 signs of the Hadamard
factors in format 2), so a packed file loads into it by name. What the kernels need beyond
them (format-1 codes moved into the format-2 layout, dense Hadamard factors rebuilt in
float32 from their signs) is derived once, on the first call, into non-persistent buffers.
The lattice matrix M is shared by every linear of a config: it lives once in the model's
`LatticeBank` (the root module `liftq_lattice`), which each linear looks up at call time, so
`model.to(device)` moves it once. The product runs in `liftq_kernels.liftq_linear` (Triton
on CUDA, torch on CPU).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from liftq_cli.io.packed import TORCH_DTYPES
from liftq_cli.io.packed_format import (
    FORMAT_VERSION,
    code_bits,
    lattice_buffer,
    lattice_tensor,
    linear_tensors,
)
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.reconstruct import reconstruct
from liftq_cli.quant.whitening import Whitening
from liftq_kernels.ops import liftq_linear
from liftq_kernels.reference import interleave_words, signed_hadamard, unpack_interleaved


class LatticeBank(nn.Module):
    """The lattice matrices M (float32 [d, D]) of a model, one buffer `D{D}_d{d}` per config."""

    def __init__(self, configs: Iterable[LatticeConfig], device: torch.device | str | None = None):
        super().__init__()
        self.configs = sorted(set(configs))
        for cfg in self.configs:
            spec = lattice_tensor(cfg)
            empty = torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype], device=device)
            self.register_buffer(lattice_buffer(cfg), empty)

    def matrix(self, cfg: LatticeConfig) -> torch.Tensor:
        return getattr(self, lattice_buffer(cfg))

    def extra_repr(self) -> str:
        return ", ".join(cfg.name for cfg in self.configs)


class LiftQuantLinear(nn.Module):
    """Drop-in for `nn.Linear(in_features, out_features)` holding a packed LiftQuant weight."""

    qweight: torch.Tensor  # int32 [out, W] (format 2: padded, interleaved; 1: plain bitstream)
    qscale: torch.Tensor  # fp16 [out]
    s1: torch.Tensor  # fp16 [in]
    s2: torch.Tensor  # fp16 [in]
    # p1 / p2: fp16 [a, a] / [b, b], or p1_signs / p2_signs: int8 [a] / [b] (format 2)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: LatticeConfig,
        bank: LatticeBank,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        version: int = FORMAT_VERSION,
        dense_factors: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        self.version = version
        specs = linear_tensors(out_features, in_features, cfg, version, dense_factors)
        for name, spec in specs.items():
            empty = torch.empty(spec.shape, dtype=TORCH_DTYPES[spec.dtype], device=device)
            self.register_buffer(name, empty)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # Not a submodule: the bank belongs to the root model and is stored once.
        object.__setattr__(self, "bank", bank)

    @property
    def lattice(self) -> torch.Tensor:
        return self.bank.matrix(self.cfg)

    def _factor(self, name: str) -> torch.Tensor:
        """P1 or P2 dense: the stored fp16 factor, or float32 rebuilt from its stored signs."""
        if f"{name}_signs" not in self._buffers:
            return self._buffers[name]
        if f"_{name}_dense" not in self._buffers:
            dense = signed_hadamard(self._buffers[f"{name}_signs"])
            self.register_buffer(f"_{name}_dense", dense, persistent=False)
        return self._buffers[f"_{name}_dense"]

    def kernel_words(self) -> torch.Tensor:
        """The codes in the kernels' (format-2) layout; format-1 codes are moved once."""
        if self.version >= 2:
            return self.qweight
        if "_words" not in self._buffers:
            self.register_buffer("_words", interleave_words(self.qweight), persistent=False)
        return self._buffers["_words"]

    def kernel_args(self) -> tuple[torch.Tensor, ...]:
        """(words, scale, s1, p1, p2, s2, lattice) as `liftq_kernels.liftq_linear` takes them."""
        p1, p2 = self._factor("p1"), self._factor("p2")
        return self.kernel_words(), self.qscale, self.s1, p1, p2, self.s2, self.lattice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x.dtype."""
        flat = x.reshape(-1, self.in_features)
        y = liftq_linear(flat, *self.kernel_args())
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, float32 [out, in] (for checks, not inference)."""
        k = code_bits(self.in_features, self.cfg)
        bits = unpack_interleaved(self.kernel_words(), k)
        signs = (bits.float() * 2 - 1).view(self.out_features, -1, self.cfg.D)
        p1, p2 = self._factor("p1"), self._factor("p2")
        factors = Whitening(*(t.float() for t in (self.s1, p1, p2, self.s2)))
        return reconstruct(signs, self.lattice.float(), self.qscale.float(), factors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"config={self.cfg.name}, bias={self.bias is not None}, format={self.version}"
        )


def replace_linears(
    model: nn.Module,
    layers: dict[str, LatticeConfig],
    device: torch.device | str | None = None,
    version: int = FORMAT_VERSION,
    dense_factors: bool = False,
) -> LatticeBank:
    """Swap every `nn.Linear` named in `layers` for a `LiftQuantLinear`; attach the bank.

    The bank becomes `model.liftq_lattice` (the name the packed file uses). Raises KeyError
    naming a layer that is not an `nn.Linear` of `model`.
    """
    bank = LatticeBank(layers.values(), device=device)
    model.liftq_lattice = bank
    for name, cfg in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if not isinstance(old, nn.Linear):
            raise KeyError(f"'{name}' is not an nn.Linear of {type(model).__name__}")
        new = LiftQuantLinear(
            old.in_features,
            old.out_features,
            cfg,
            bank,
            bias=old.bias is not None,
            device=device,
            dtype=old.weight.dtype,
            version=version,
            dense_factors=dense_factors,
        )
        setattr(parent, child, new)
    return bank
