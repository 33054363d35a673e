"""Training of a LiftQuant mapping matrix M (d, D) for an i.i.d. N(0, I_d) source.

Lloyd alternation: encode a fresh Gaussian sample X [n, d] with the K-best search
(`lattice.encode`), then set M to the least-squares optimum for those codes,
M = X^T Q (Q^T Q)^-1, and repeat. Each step cannot raise the training-sample MSE for the
codes it was fitted to, and a fresh sample per step keeps M from overfitting. The last
`final_iterations` steps use a much larger sample (`final_samples`), which removes most of
the estimation noise of M (with n samples the fitted M is ~D*d/n relatively worse); with
`memory` they pool the normal equations of earlier steps instead, which does the same on
small samples. Optional polish steps at a wider beam fit M to a near-exact search.
M starts with orthonormal rows (the paper's initialisation), so E||M q||^2 = d.
Lloyd stops in a local optimum that depends on the start, so `restarts` independent starts
are trained and the one with the lowest MSE on a validation sample (not the evaluation
sample) is kept.

Samples are drawn on CPU from one torch.Generator per start and moved to `device`, so a
(config, TrainConfig) pair gives the same sample stream on any machine; the matrices agree
up to float rounding between devices (the manifest records the device used).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quant.lattice import (
    DEFAULT_SEARCH,
    SearchConfig,
    encode,
    gaussian_mse,
    signs_from_codes,
)

EVAL_SAMPLES = 100_000
EVAL_SEED = 1234  # held-out Gaussian sample for every reported MSE
VALIDATION_SAMPLES = 65_536
VALIDATION_SEED = 4321  # picks the best restart; distinct from the evaluation sample


@dataclass(frozen=True)
class TrainConfig:
    """Lloyd schedule for one matrix.

    iterations:        Lloyd steps on `samples` fresh slices each,
    final_iterations:  then this many on `final_samples` fresh slices each.
    train_beam:        K-best beam while training.
    memory:            each final and polish step solves its own normal equations plus
                       `memory` times the previous step's (0: plain Lloyd). 0.9 pools ~10
                       samples, so small samples stop adding estimation noise to M while M
                       still moves. The first `iterations` are plain Lloyd, which moves
                       fastest from the start.
    polish_iterations: then this many steps on `samples` slices encoded at `polish_beam`,
                       which fits M to a near-exact search instead of the training beam's.
    search_beam:       the beam of the encoder this matrix is shipped with: validation and
                       the reported MSE use it, and so does the quantiser (manifest
                       `search_beam`; a wider beam costs encode time linearly).
    restarts:          independent starts (seeds seed*1000 + r); the best on validation wins.
    init:              "orthonormal" (random orthonormal rows), "hadamard" (D = 2d, d a
                       power of two: M = [a I, H/sqrt(d)] with a = ratio + 0.1 r for start r),
                       "mixed" (even starts hadamard with a = ratio + 0.1 r/2, odd
                       orthonormal) or "blocks" (LQ-16/8 only: the closed-form matrix of
                       `block_hadamard_start`).
    fit:               "matrix" (each step solves for all of M) or "scale" (each step
                       solves only for a global scale of M, which keeps a closed-form start
                       exact instead of adding the estimation noise of D*d free entries).
    seed:              base seed.
    ratio:             a of the first hadamard start.
    """

    iterations: int = 40
    samples: int = 32_768
    final_iterations: int = 0
    final_samples: int = 262_144
    train_beam: int = 32
    memory: float = 0.0
    polish_iterations: int = 0
    polish_beam: int = 256
    search_beam: int = DEFAULT_SEARCH.beam
    restarts: int = 1
    init: str = "orthonormal"
    fit: str = "matrix"
    seed: int = 0
    ratio: float = 1.2

    def __post_init__(self) -> None:
        for name in ("iterations", "final_iterations", "polish_iterations"):
            if getattr(self, name) < 0:
                raise BadInputError(f"{name}={getattr(self, name)} is invalid: use 0 or more")
        if self.samples < 256 or self.final_samples < 256:
            raise BadInputError(f"samples={self.samples} is too few: use at least 256")
        for name in ("train_beam", "polish_beam", "search_beam"):
            if getattr(self, name) < 1:
                raise BadInputError(f"{name}={getattr(self, name)} is invalid: use at least 1")
        if not 0 <= self.memory < 1:
            raise BadInputError(f"memory={self.memory} is invalid: use 0 (plain Lloyd) to 0.99")
        if self.restarts < 1:
            raise BadInputError(f"restarts={self.restarts} is invalid: use at least 1")
        if self.init not in ("orthonormal", "hadamard", "mixed", "blocks"):
            raise BadInputError(
                f"init '{self.init}' is unknown: use orthonormal, hadamard, mixed or blocks"
            )
        if self.fit not in ("matrix", "scale"):
            raise BadInputError(f"fit '{self.fit}' is unknown: use matrix or scale")

    def check(self, cfg: LatticeConfig) -> None:
        """Refuse a schedule that cannot train `cfg` (hadamard needs D = 2d, d = 2^k;
        blocks exists for LQ-16/8 only)."""
        if self.init == "blocks" and (cfg.D, cfg.d) != (16, 8):
            raise BadInputError(f"init blocks is defined for LQ-16/8, not {cfg.name}: use hadamard")
        if self.init != "orthonormal" and (2 * cfg.d != cfg.D or cfg.d & (cfg.d - 1)):
            raise BadInputError(
                f"init {self.init} needs D = 2d with d a power of two, not {cfg.name}: "
                "use init orthonormal"
            )


@dataclass
class TrainResult:
    """A trained matrix with its provenance; `mse` is measured on the held-out sample."""

    config: LatticeConfig
    train: TrainConfig
    matrix: Tensor  # (d, D) float32, on CPU
    mse: float
    seconds: float
    device: str = "cpu"
    restart: int = 0  # which start won
    history: list[float] = field(default_factory=list)  # training-sample MSE per step
    validation: list[float] = field(default_factory=list)  # validation MSE per start

    def manifest_entry(self) -> dict[str, object]:
        return {
            "name": self.config.name,
            "D": self.config.D,
            "d": self.config.d,
            "bits": round(self.config.bits, 6),
            "seed": self.train.seed,
            "iterations": self.train.iterations,
            "samples_per_iteration": self.train.samples,
            "final_iterations": self.train.final_iterations,
            "final_samples": self.train.final_samples,
            "train_beam": self.train.train_beam,
            "memory": self.train.memory,
            "polish_iterations": self.train.polish_iterations,
            "polish_beam": self.train.polish_beam,
            "search_beam": self.train.search_beam,
            "fit": self.train.fit,
            "restarts": self.train.restarts,
            "init": self.train.init,
            **({"ratio": self.train.ratio} if self.train.init in ("hadamard", "mixed") else {}),
            "best_restart": self.restart,
            "gaussian_mse": round(self.mse, 6),
            "eval_samples": EVAL_SAMPLES,
            "eval_seed": EVAL_SEED,
            "train_device": self.device,
            "train_seconds": round(self.seconds, 1),
        }

    def as_json(self) -> dict[str, object]:
        return {
            **self.manifest_entry(),
            "train": asdict(self.train),
            "history": self.history,
            "validation": self.validation,
        }


def orthonormal_rows(cfg: LatticeConfig, generator: torch.Generator) -> Tensor:
    """Random (d, D) float32 matrix with orthonormal rows (CPU generator, CPU tensor)."""
    q, r = torch.linalg.qr(torch.randn(cfg.D, cfg.d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # unique QR: fixed signs for determinism
    return q.T.to(torch.float32).contiguous()


def _sylvester(n: int) -> Tensor:
    """The n x n Sylvester Hadamard matrix (n a power of two), float64 +-1."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
    return H


def _unit_energy(M: Tensor) -> Tensor:
    """M scaled so that E||M q||^2 = ||M||_F^2 = d, as float32."""
    return (M * (M.shape[0] / (M * M).sum()) ** 0.5).to(torch.float32).contiguous()


def hadamard_start(cfg: LatticeConfig, ratio: float) -> Tensor:
    """[ratio * I, H / sqrt(d)] scaled so that E||M q||^2 = d: (d, 2d) float32 (Sylvester H)."""
    H = _sylvester(cfg.d)
    return _unit_energy(
        torch.cat([ratio * torch.eye(cfg.d, dtype=torch.float64), H / cfg.d**0.5], 1)
    )


def block_hadamard_start(cfg: LatticeConfig, a: float = 0.5) -> Tensor:
    """The closed-form LQ-16/8 matrix [I, R] (scaled to E||M q||^2 = d), R orthogonal
    (`block_rotation(a)`; the catalog's a = 1/2).

    R has the signs of the Sylvester H8 with its column pairs (4, 5) and (6, 7) swapped;
    its magnitudes are 1/2 on the four diagonal 2x2 blocks and 1/(2 sqrt 3) elsewhere.
    With that column order every diagonal 2x2 block is +-H2 and R R^T = I holds exactly for
    any block magnitude a (off the blocks sqrt((1 - 2a^2)/6)). Lloyd from the plain
    Hadamard start (a = 1/sqrt 8 everywhere) ends near this two-level pattern, but with
    every entry off by its estimation noise; the exact pattern with a = 1/2 has the lower
    Gaussian MSE, and a = 1/2 is the best of the family (bench/lattice_16_8.py).
    """
    if (cfg.D, cfg.d) != (16, 8):
        raise BadInputError(f"the block Hadamard start is LQ-16/8's, not {cfg.name}")
    return _unit_energy(torch.cat([torch.eye(8, dtype=torch.float64), block_rotation(a)], 1))


def block_rotation(a: float) -> Tensor:
    """The 8 x 8 orthogonal R of `block_hadamard_start` with block magnitude a, float64."""
    if not 0 <= a <= 0.5**0.5:
        raise BadInputError(f"block magnitude {a} is invalid: use 0 to 1/sqrt(2)")
    signs = _sylvester(8)[:, [0, 1, 2, 3, 6, 7, 4, 5]]
    blocks = torch.kron(torch.eye(4, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    b = ((1 - 2 * a * a) / 6) ** 0.5
    return signs * (b + (a - b) * blocks)


def normal_equations(x: Tensor, signs: Tensor) -> tuple[Tensor, Tensor]:
    """(Q^T Q [D, D], Q^T X [D, d]) in float64 for x [n, d] and signs [n, D] +-1."""
    q = signs.to(torch.float64)
    return q.T @ q, q.T @ x.to(torch.float64)


def solve_normal_equations(gram: Tensor, cross: Tensor) -> Tensor:
    """M = (Q^T X)^T (Q^T Q)^-1, float32 (d, D); a 1e-9 relative ridge keeps it defined."""
    scale = float(torch.diagonal(gram).mean().clamp_min(1e-30))
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(gram + 1e-9 * scale * eye, cross).T.to(torch.float32).contiguous()


def solve_scale(gram: Tensor, cross: Tensor, M: Tensor) -> Tensor:
    """c M with the least-squares scale c for fixed codes: c = tr(M Q^T X) / tr(M Q^T Q M^T)."""
    Md = M.to(gram.device, torch.float64)
    c = torch.trace(Md @ cross) / torch.trace(Md @ gram @ Md.T).clamp_min(1e-30)
    return (c * Md).to(torch.float32).contiguous()


def least_squares_matrix(x: Tensor, signs: Tensor) -> Tensor:
    """Optimal M for fixed codes: argmin ||X - Q M^T||_F = X^T Q (Q^T Q)^-1, float32 (d, D).

    x [n, d], signs [n, D] +-1 (same device); float64 normal equations.
    """
    return solve_normal_equations(*normal_equations(x, signs))


def held_out_sample(d: int, n: int = EVAL_SAMPLES, seed: int = EVAL_SEED) -> Tensor:
    """The fixed N(0, I_d) evaluation sample, [n, d] float32 on CPU."""
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def evaluate_matrix(
    M: Tensor,
    n: int = EVAL_SAMPLES,
    search: SearchConfig = DEFAULT_SEARCH,
    seed: int = EVAL_SEED,
) -> float:
    """Per-dimension Gaussian MSE of `encode` with M on the held-out sample (on M's device)."""
    x = held_out_sample(M.shape[0], n, seed).to(M.device)
    return gaussian_mse(x, M, encode(x, M, search))


def _start(cfg: LatticeConfig, train: TrainConfig, restart: int, gen: torch.Generator) -> Tensor:
    if train.init == "blocks":
        return block_hadamard_start(cfg)
    if train.init == "hadamard":
        return hadamard_start(cfg, train.ratio + 0.1 * restart)
    if train.init == "mixed" and restart % 2 == 0:
        return hadamard_start(cfg, train.ratio + 0.1 * (restart // 2))
    return orthonormal_rows(cfg, gen)


def _lloyd(
    cfg: LatticeConfig,
    train: TrainConfig,
    restart: int,
    device: torch.device,
    step_done: Callable[[], None],
) -> tuple[Tensor, list[float]]:
    generator = torch.Generator().manual_seed(train.seed * 1000 + restart)
    M = _start(cfg, train, restart, generator).to(device)
    history: list[float] = []
    steps = (
        [(train.samples, train.train_beam)] * train.iterations
        + [(train.final_samples, train.train_beam)] * train.final_iterations
        + [(train.samples, train.polish_beam)] * train.polish_iterations
    )
    pooled: tuple[Tensor, Tensor] | None = None
    for step, (n, beam) in enumerate(steps):
        x = torch.randn(n, cfg.d, generator=generator).to(device)
        signs = signs_from_codes(encode(x, M, SearchConfig(beam=beam)))
        history.append(round(float(((x - signs @ M.T) ** 2).mean()), 6))
        gram, cross = normal_equations(x, signs)
        if pooled is not None and train.memory and step > train.iterations:
            gram, cross = gram + train.memory * pooled[0], cross + train.memory * pooled[1]
        pooled = (gram, cross)
        M = (
            solve_scale(gram, cross, M)
            if train.fit == "scale"
            else solve_normal_equations(gram, cross)
        )
        step_done()
    return M, history


def train_matrix(
    cfg: LatticeConfig,
    train: TrainConfig = TrainConfig(),
    progress: Callable[[int, int], None] | None = None,
    eval_samples: int = EVAL_SAMPLES,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train M for `cfg` by Lloyd alternation (with restarts); returns the best start with
    its held-out MSE. Runs on `device` ("cpu" or "cuda"); the matrix comes back on CPU."""
    train.check(cfg)
    start = time.perf_counter()
    device = torch.device(device)
    total = train.restarts * (train.iterations + train.final_iterations + train.polish_iterations)
    search = SearchConfig(beam=train.search_beam)
    done = [0]

    def step_done() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    best: tuple[float, int, Tensor, list[float]] | None = None
    validation: list[float] = []
    for r in range(train.restarts):
        M, history = _lloyd(cfg, train, r, device, step_done)
        score = 0.0  # a single start needs no validation
        if train.restarts > 1:
            score = evaluate_matrix(M, VALIDATION_SAMPLES, search, VALIDATION_SEED)
            validation.append(round(score, 6))
        if best is None or score < best[0]:
            best = (score, r, M, history)
    assert best is not None
    _, restart, M, history = best
    mse = evaluate_matrix(M, eval_samples, search)
    return TrainResult(
        cfg,
        train,
        M.cpu(),
        mse,
        time.perf_counter() - start,
        device.type,
        restart,
        history,
        validation,
    )
