"""Whitening of a linear layer's weight before lattice encoding.

    T = diag(s1) (P1 kron P2) diag(s2),      W x = (W T) (T^-1 x)

`P1` (a x a) and `P2` (b x b) are orthogonal with a * b = in_features, a <= b the divisor pair
closest to sqrt(in_features). They start as a Hadamard matrix with random signs where the size
is a power of two and as a randomised orthonormal DCT-II otherwise: both spread every weight
over all coordinates so the whitened rows look Gaussian. `s1` is activation-aware (AWQ: input
channels with large activations get a larger scale, so their weights are stored more
accurately), `s2` is per channel after the rotation. Both are then trained against a uniform
straight-through proxy of the target bit-width (paper eq. 3), minimising the output error
tr(E H E^T) with H = X^T X the calibration Gram matrix and E = W - W_proxy.

For a row vector v of length a*b, v (P1 kron P2) = vec(P1^T V P2) with V = v.reshape(a, b), and
(P1 kron P2)^T x = vec(P1^T X P2) too, so one helper serves both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from liftq_kernels.reference import sylvester


@dataclass
class Whitening:
    """Factors of T for one linear layer (all float32)."""

    s1: torch.Tensor  # [n]
    p1: torch.Tensor  # [a, a], orthogonal
    p2: torch.Tensor  # [b, b], orthogonal
    s2: torch.Tensor  # [n]

    @property
    def in_features(self) -> int:
        return self.s1.numel()

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{k}": getattr(self, k).contiguous() for k in ("s1", "p1", "p2", "s2")}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> Whitening:
        return cls(*(state[f"{prefix}{k}"].float() for k in ("s1", "p1", "p2", "s2")))


def kron_factors(n: int) -> tuple[int, int]:
    """The divisor pair (a, b) of n with a <= b closest to sqrt(n)."""
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def orthogonal_init(size: int, generator: torch.Generator) -> torch.Tensor:
    """Random-sign Hadamard (size a power of two) or random-sign orthonormal DCT-II, built on
    the CPU (the generator's device) so that every device gets the same rotation."""
    signs = torch.randint(0, 2, (size,), generator=generator, device="cpu").float() * 2 - 1
    if size & (size - 1) == 0:
        basis = sylvester(size)
    else:
        k = torch.arange(size, dtype=torch.float64, device="cpu").unsqueeze(1)
        i = torch.arange(size, dtype=torch.float64, device="cpu").unsqueeze(0)
        basis = torch.cos(math.pi / size * (i + 0.5) * k) * math.sqrt(2.0 / size)
        basis[0] /= math.sqrt(2.0)
        basis = basis.float()
    return signs.unsqueeze(1) * basis  # rows of a DCT/Hadamard with flipped signs


def kron_rows(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Apply the Kronecker rotation to the last dim: returns vec(P1^T X P2) for each row."""
    a, b = p1.shape[0], p2.shape[0]
    shaped = x.reshape(*x.shape[:-1], a, b)
    return (p1.transpose(0, 1) @ shaped @ p2).reshape(x.shape)


def kron_rows_inverse(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Inverse of `kron_rows` for orthogonal factors: vec(P1 X P2^T)."""
    a, b = p1.shape[0], p2.shape[0]
    shaped = x.reshape(*x.shape[:-1], a, b)
    return (p1 @ shaped @ p2.transpose(0, 1)).reshape(x.shape)


def whiten_weight(weight: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """W T for weight [out, n]."""
    return kron_rows(weight * wh.s1, wh.p1, wh.p2) * wh.s2


def unwhiten_weight(whitened: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """(W T) T^-1 = W: maps a whitened weight [out, n] back to the original basis."""
    return kron_rows_inverse(whitened / wh.s2, wh.p1, wh.p2) / wh.s1


def lift_activation(x: torch.Tensor, wh: Whitening) -> torch.Tensor:
    """T^-1 x for activations [..., n] (the runtime side of the same identity)."""
    return kron_rows(x / wh.s1, wh.p1, wh.p2) / wh.s2


def init_whitening(in_features: int, act_scale: torch.Tensor, alpha: float, seed: int) -> Whitening:
    """Hadamard/DCT rotation, AWQ scale s1 = mean|x|^alpha (geometric mean 1), s2 = 1, on
    act_scale's device (the random signs are drawn on the CPU, so every device gets the same
    rotation)."""
    device = act_scale.device
    generator = torch.Generator().manual_seed(seed)
    a, b = kron_factors(in_features)
    s1 = act_scale.clamp_min(1e-6).pow(alpha)
    s1 = s1 / s1.log().mean().exp()
    return Whitening(
        s1=s1.float(),
        p1=orthogonal_init(a, generator).to(device),
        p2=orthogonal_init(b, generator).to(device),
        s2=torch.ones(in_features, device=device),
    )


def uniform_proxy(whitened: torch.Tensor, bits: float) -> torch.Tensor:
    """Straight-through uniform quantiser with 2^bits levels per row (bits may be fractional).

    The clip range is the Gaussian-optimal one for that many levels (about 2.5 sigma at 2
    bits); gradients pass straight through the rounding.
    """
    levels = 2.0**bits
    sigma = whitened.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-8)
    half_range = sigma * (1.1 + 0.55 * bits)
    step = 2 * half_range / levels
    clipped = torch.maximum(torch.minimum(whitened, half_range), -half_range)
    rounded = (clipped / step - 0.5).round() * step + step / 2
    return clipped + (rounded - clipped).detach()


def proxy_error(
    weight: torch.Tensor, wh: Whitening, gram: torch.Tensor, bits: float
) -> torch.Tensor:
    """tr(E H E^T) / tr(W H W^T) for E = W - T^-1-image of the proxy-quantised W T."""
    whitened = whiten_weight(weight, wh)
    approx = unwhiten_weight(uniform_proxy(whitened, bits), wh)
    err = weight - approx
    return ((err @ gram) * err).sum() / ((weight @ gram) * weight).sum().clamp_min(1e-12)


def cayley(skew_part: torch.Tensor) -> torch.Tensor:
    """The orthogonal (I - K)^-1 (I + K) of K = A - A^T: identity at A = 0, differentiable."""
    k = skew_part - skew_part.transpose(0, 1)
    eye = torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
    return torch.linalg.solve(eye - k, eye + k)


def fit_whitening(
    weight: torch.Tensor,
    gram: torch.Tensor,
    act_scale: torch.Tensor,
    bits: float,
    steps: int = 100,
    lr: float = 5e-3,
    seed: int = 0,
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75),
    rotations: str = "fixed",
    lr_rotations: float = 3e-3,
) -> tuple[Whitening, float]:
    """Pick the AWQ exponent on the proxy, then train log s1 and log s2 with Adam.

    weight: [out, n] float32; gram: X^T X [n, n] of the layer's calibration inputs;
    act_scale: mean |x| per input channel [n]. rotations: "fixed" keeps the random-sign
    Hadamard / DCT factors; "trained" also trains P1 and P2 as P0 cayley(A) (orthogonal by
    construction, starting at P0) at lr_rotations, as the paper does. Returns the whitening
    and its proxy error.
    """
    weight = weight.float()
    gram = gram.float() / gram.diagonal().mean().clamp_min(1e-12)
    n = weight.shape[1]
    best: tuple[float, Whitening] | None = None
    with torch.no_grad():
        for alpha in alphas:
            candidate = init_whitening(n, act_scale, alpha, seed)
            err = float(proxy_error(weight, candidate, gram, bits))
            if best is None or err < best[0]:
                best = (err, candidate)
    assert best is not None
    wh = best[1]
    if steps <= 0:
        return wh, best[0]
    log_s1 = wh.s1.log().clone().requires_grad_(True)
    log_s2 = wh.s2.log().clone().requires_grad_(True)
    groups = [{"params": [log_s1, log_s2], "lr": lr}]
    skews: list[torch.Tensor] = []
    if rotations == "trained":
        skews = [torch.zeros_like(p, requires_grad=True) for p in (wh.p1, wh.p2)]
        groups.append({"params": skews, "lr": lr_rotations})
    elif rotations != "fixed":
        raise ValueError(f"rotations {rotations!r}: fixed or trained")
    optimizer = torch.optim.Adam(groups)

    def current() -> Whitening:
        if not skews:
            return Whitening(log_s1.exp(), wh.p1, wh.p2, log_s2.exp())
        p1, p2 = (p @ cayley(a) for p, a in zip((wh.p1, wh.p2), skews, strict=True))
        return Whitening(log_s1.exp(), p1, p2, log_s2.exp())

    def frozen(w: Whitening) -> Whitening:
        return Whitening(*(t.detach().clone() for t in (w.s1, w.p1, w.p2, w.s2)))

    best_err, best_wh = best[0], frozen(current())
    for _ in range(steps):
        candidate = current()
        loss = proxy_error(weight, candidate, gram, bits)
        if float(loss.detach()) < best_err:
            best_err, best_wh = float(loss.detach()), frozen(candidate)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return best_wh, best_err
