"""`LiftQuantLinear`: a linear layer that computes from the packed format.

    y = diag(s) Q (blockdiag(M)^T T^-1 x) + bias

Buffers are exactly the tensors `io.packed_format.linear_tensors` lists (int32 sign words,
fp16 scales and whitening factors), so a packed file loads into it by name. The lattice matrix
M is shared by every linear of a config: it lives once in the model's `LatticeBank` (the root
module `liftq_lattice`), which each linear looks up at call time, so `model.to(device)` moves
it once. The product runs in `liftq_kernels.liftq_linear` (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from liftq_cli.io.packed_format import code_bits, lattice_buffer, lattice_tensor, linear_tensors
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.reconstruct import reconstruct
from liftq_cli.quant.whitening import Whitening
from liftq_kernels.ops import liftq_linear
from liftq_kernels.reference import unpack_signs

TORCH_DTYPES = {"int32": torch.int32, "float16": torch.float16, "float32": torch.float32}


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

    qweight: torch.Tensor  # int32 [out, ceil(ceil(in/d) * D / 32)]
    qscale: torch.Tensor  # fp16 [out]
    s1: torch.Tensor  # fp16 [in]
    p1: torch.Tensor  # fp16 [a, a]
    p2: torch.Tensor  # fp16 [b, b]
    s2: torch.Tensor  # fp16 [in]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        cfg: LatticeConfig,
        bank: LatticeBank,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.cfg = cfg
        for name, spec in linear_tensors(out_features, in_features, cfg).items():
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] float -> [..., out_features] in x.dtype."""
        flat = x.reshape(-1, self.in_features)
        y = liftq_linear(
            flat, self.qweight, self.qscale, self.s1, self.p1, self.p2, self.s2, self.lattice
        )
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, float32 [out, in] (for checks, not inference)."""
        k = code_bits(self.in_features, self.cfg)
        signs = unpack_signs(self.qweight, k).view(self.out_features, -1, self.cfg.D)
        factors = Whitening(*(t.float() for t in (self.s1, self.p1, self.p2, self.s2)))
        return reconstruct(signs, self.lattice.float(), self.qscale.float(), factors)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"config={self.cfg.name}, bias={self.bias is not None}"
        )


def replace_linears(
    model: nn.Module,
    layers: dict[str, LatticeConfig],
    device: torch.device | str | None = None,
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
        )
        setattr(parent, child, new)
    return bank
