"""Lattice encoder, training and catalog: exactness, MSE bounds per config, determinism."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import CATALOG_CONFIGS, LatticeConfig, LatticeConfigError
from liftq_cli.quant.lattice import (
    SearchConfig,
    brute_force_encode,
    decode,
    encode,
    encode_candidates,
    gaussian_mse,
    pack_codes,
    pad_search_encode,
    search_order,
    unpack_codes,
)
from liftq_cli.quant.lattice_catalog import (
    catalog_encode,
    catalog_manifest,
    catalog_search,
    load_catalog_matrix,
)
from liftq_cli.quant.lattice_train import (
    TrainConfig,
    block_hadamard_start,
    block_rotation,
    hadamard_start,
    held_out_sample,
    least_squares_matrix,
    normal_equations,
    orthonormal_rows,
    solve_scale,
    train_matrix,
)

# Table 1 of the paper (pad search on the paper's matrices).
PAPER_MSE = {
    (16, 8): 0.089,
    (32, 16): 0.082,
    (30, 14): 0.070,
    (24, 10): 0.053,
    (32, 20): 0.146,
}
# Configs whose catalog matrix is still above the paper (see bench/results/lattice_16_8.md):
# LQ-16/8 0.0901 on the 100k held-out slices, 0.08995 on 2.6M fresh ones (our encoder is
# exact there: brute force over all 2^16 codes gives the same MSE, so the gap is the
# matrix). Strict xfail, so the test starts failing (and must be un-marked) once it is met.
BELOW_PAPER_MISSED: set[tuple[int, int]] = {(16, 8)}


def gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_matrix() -> torch.Tensor:
    """A trained LQ-12/6 matrix (a few Lloyd steps): structured like the catalog ones."""
    result = train_matrix(
        LatticeConfig(12, 6), TrainConfig(iterations=4, samples=4096, seed=3), eval_samples=2048
    )
    return result.matrix


@pytest.mark.parametrize("matrix_kind", ["trained", "random"])
def test_encode_matches_exhaustive_search_on_small_config(small_matrix, matrix_kind):
    M = (
        small_matrix
        if matrix_kind == "trained"
        else orthonormal_rows(LatticeConfig(12, 6), torch.Generator().manual_seed(1))
    )
    x = gaussian(1000, 6, seed=11)
    ours, exact = encode(x, M), brute_force_encode(x, M)
    assert ours.dtype == torch.bool and ours.shape == (1000, 12)
    # Ties aside, the K-best search with the default beam is exact at D=12.
    assert (ours == exact).all(1).float().mean() >= 0.995
    assert gaussian_mse(x, M, ours) <= gaussian_mse(x, M, exact) * (1 + 1e-4)
    # Reference encoders: the published pad search is never better than the optimum.
    assert gaussian_mse(x, M, pad_search_encode(x, M)) >= gaussian_mse(x, M, exact) * (1 - 1e-6)


def test_small_beam_is_close_to_exact_and_tail_completion_helps(small_matrix):
    x = gaussian(2000, 6, seed=4)
    exact = gaussian_mse(x, small_matrix, brute_force_encode(x, small_matrix))
    narrow = {
        tail: gaussian_mse(x, small_matrix, encode(x, small_matrix, SearchConfig(4, tail=tail)))
        for tail in (0, 8)
    }
    assert exact <= narrow[8] <= narrow[0] < 1.2 * exact
    # beam 16 with 8 exhaustive tail signs covers all 2^12 codes: exact.
    full = encode(x, small_matrix, SearchConfig(beam=16, tail=8))
    assert gaussian_mse(x, small_matrix, full) <= exact * (1 + 1e-6)


def test_encode_decode_shapes_and_int8_codes(small_matrix):
    x = gaussian(2 * 3 * 5, 6, seed=2).reshape(2, 3, 5, 6)
    codes = encode(x, small_matrix, SearchConfig(beam=8, chunk=7))
    assert codes.shape == (2, 3, 5, 12) and codes.dtype == torch.bool
    recon = decode(codes, small_matrix)
    assert recon.shape == x.shape and recon.dtype == torch.float32
    signs = codes.to(torch.int8) * 2 - 1
    assert torch.equal(decode(signs, small_matrix), recon)
    flat = encode(x.reshape(-1, 6), small_matrix, SearchConfig(beam=8))
    assert torch.equal(flat.reshape(codes.shape), codes)  # chunking does not change results
    assert encode(torch.zeros(0, 6), small_matrix).shape == (0, 12)


def test_threads_and_chunks_give_identical_codes():
    M = orthonormal_rows(LatticeConfig(24, 10), torch.Generator().manual_seed(5))
    x = gaussian(3000, 10, seed=8)
    before = torch.get_num_threads()
    one = encode(x, M, SearchConfig(threads=1))
    assert torch.equal(one, encode(x, M, SearchConfig(threads=2, chunk=500)))
    assert torch.get_num_threads() == before  # restored after the single-threaded section


def test_candidates_are_sorted_and_start_with_the_encoding(small_matrix):
    x = gaussian(300, 6, seed=9)
    codes, errors = encode_candidates(x, small_matrix, 5)
    assert codes.shape == (300, 5, 12) and errors.shape == (300, 5)
    assert (errors[:, 1:] >= errors[:, :-1] - 1e-5).all()
    assert torch.equal(codes[:, 0], encode(x, small_matrix))
    recon = decode(codes, small_matrix)
    assert torch.allclose(((x[:, None] - recon) ** 2).sum(-1), errors, atol=1e-4)


def test_pack_unpack_roundtrip_and_search_order():
    codes = torch.rand(257, 32, generator=torch.Generator().manual_seed(0)) > 0.5
    words = pack_codes(codes)
    assert words.dtype == torch.int64 and words.max() < 2**32
    assert torch.equal(unpack_codes(words, 32), codes)
    M = orthonormal_rows(LatticeConfig(32, 10), torch.Generator().manual_seed(2))
    assert sorted(search_order(M, 0.1).tolist()) == list(range(32))


def test_wider_beam_is_never_worse(small_matrix):
    x = gaussian(2000, 6, seed=5)
    narrow = gaussian_mse(x, small_matrix, encode(x, small_matrix, SearchConfig(beam=2, tail=0)))
    wide = gaussian_mse(x, small_matrix, encode(x, small_matrix, SearchConfig(beam=64)))
    assert wide < narrow


@pytest.mark.parametrize("pair", [(24, 10), (32, 20)], ids=["LQ-24/10", "LQ-32/20"])
def test_encoder_is_as_good_as_pad_search(pair):
    """Same matrix, same slices; LQ-32/20 also covers sign bit 31 of the packed words.
    Speed is measured side by side in bench/lattice.py, not asserted here."""
    cfg = LatticeConfig(*pair)
    M = load_catalog_matrix(cfg)
    x = gaussian(300, cfg.d, seed=21)
    pad = pad_search_encode(x, M)
    ours = encode(x, M)
    assert gaussian_mse(x, M, ours) <= 1.01 * gaussian_mse(x, M, pad)


def test_catalog_covers_every_config_with_shapes():
    manifest = catalog_manifest()
    names = [entry["name"] for entry in manifest["entries"]]
    assert sorted(names) == sorted(cfg.name for cfg in CATALOG_CONFIGS)
    for cfg in CATALOG_CONFIGS:
        M = load_catalog_matrix(cfg)
        assert M.shape == (cfg.d, cfg.D) and M.dtype == torch.float32
        assert torch.isfinite(M).all()


def test_catalog_ships_each_matrix_with_its_search_beam():
    """Every entry names the beam its MSE was measured with; the quantiser's encoder
    (catalog_encode) uses it. LQ-32/16 ships with a 256-wide beam, the rest with 64."""
    entries = {e["name"]: e for e in catalog_manifest()["entries"]}
    assert {e["search_beam"] for e in entries.values()} <= {64, 256}
    for cfg in CATALOG_CONFIGS:
        assert catalog_search(cfg).beam == entries[cfg.name]["search_beam"], cfg.name
    assert entries["LQ-32/16"]["search_beam"] == 256
    cfg = LatticeConfig(32, 16)
    M, x = load_catalog_matrix(cfg), gaussian(512, 16, seed=8)
    wide = encode(x, M, SearchConfig(beam=256))
    assert torch.equal(catalog_encode(x, M), wide)
    assert gaussian_mse(x, M, wide) < gaussian_mse(x, M, encode(x, M))


def test_catalog_mse_matches_manifest_for_every_config():
    """Every shipped matrix reproduces its manifest MSE (4k slices, 5% margin for noise)
    and stays within 3 dB of the rate-distortion bound."""
    entries = {e["name"]: e for e in catalog_manifest()["entries"]}
    for cfg in CATALOG_CONFIGS:
        M = load_catalog_matrix(cfg)
        x = gaussian(4096, cfg.d, seed=99)
        mse = gaussian_mse(x, M, encode(x, M, SearchConfig(beam=32)))
        assert mse <= entries[cfg.name]["gaussian_mse"] * 1.05, cfg.name
        assert mse < 2.0 * 2 ** (-2 * cfg.bits), cfg.name


@pytest.mark.parametrize(
    "pair",
    [
        pytest.param(pair, marks=pytest.mark.xfail(strict=True, reason="above the paper"))
        if pair in BELOW_PAPER_MISSED
        else pair
        for pair in PAPER_MSE
    ],
    ids=lambda p: f"LQ-{p[0]}/{p[1]}",
)
def test_catalog_at_or_below_paper(pair):
    cfg = LatticeConfig(*pair)
    entry = next(e for e in catalog_manifest()["entries"] if e["name"] == cfg.name)
    assert entry["gaussian_mse"] <= PAPER_MSE[pair]  # 100k held-out slices, shipped encoder
    M = load_catalog_matrix(cfg)
    x = held_out_sample(cfg.d, 20_000)  # the first 20k of those slices, re-encoded here
    assert gaussian_mse(x, M, catalog_encode(x, M)) <= PAPER_MSE[pair] * 1.005


def test_training_is_deterministic_and_improves():
    cfg, train = LatticeConfig(12, 6), TrainConfig(iterations=3, samples=2048, seed=7)
    first = train_matrix(cfg, train, eval_samples=2048)
    again = train_matrix(cfg, train, eval_samples=2048)
    other = train_matrix(cfg, TrainConfig(iterations=3, samples=2048, seed=8), eval_samples=2048)
    assert torch.equal(first.matrix, again.matrix) and first.mse == again.mse
    assert not torch.equal(first.matrix, other.matrix)
    assert first.history[-1] < first.history[0]  # Lloyd lowers the training MSE


def test_restarts_keep_the_best_validated_start():
    cfg = LatticeConfig(8, 4)
    train = TrainConfig(iterations=2, samples=1024, restarts=3, init="mixed", seed=1)
    result = train_matrix(cfg, train, eval_samples=2048)
    assert len(result.validation) == 3
    assert result.restart == min(range(3), key=result.validation.__getitem__)
    assert result.manifest_entry()["best_restart"] == result.restart


def test_hadamard_start_has_unit_energy():
    M = hadamard_start(LatticeConfig(16, 8), 1.4)
    assert M.shape == (8, 16)
    assert float((M * M).sum()) == pytest.approx(8.0, rel=1e-5)  # E||Mq||^2 = d


@pytest.mark.parametrize("a", [0.5**1.5, 0.5, 0.6])
def test_block_rotation_is_orthogonal_with_two_magnitudes(a):
    R = block_rotation(a)
    assert torch.allclose(R @ R.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    blocks = torch.kron(torch.eye(4), torch.ones(2, 2)).bool()
    assert torch.allclose(R.abs()[blocks], torch.full((16,), a, dtype=torch.float64))
    off = ((1 - 2 * a * a) / 6) ** 0.5
    assert torch.allclose(R.abs()[~blocks], torch.full((48,), off, dtype=torch.float64))
    # Sylvester signs with the column pairs (4, 5) and (6, 7) swapped.
    H = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H8 = torch.kron(H, torch.kron(H, H))
    assert torch.equal(torch.sign(R), H8[:, [0, 1, 2, 3, 6, 7, 4, 5]])


def test_block_rotation_breaks_without_the_column_swap():
    """The swap is what makes the two-level pattern orthogonal: plain Sylvester signs are not."""
    a, H = 0.5, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H8 = torch.kron(H, torch.kron(H, H))
    blocks = torch.kron(torch.eye(4, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64))
    b = ((1 - 2 * a * a) / 6) ** 0.5
    R = H8 * (b + (a - b) * blocks)
    assert not torch.allclose(R @ R.T, torch.eye(8, dtype=torch.float64), atol=1e-3)


def test_block_start_is_a_scaled_tight_frame():
    M = block_hadamard_start(LatticeConfig(16, 8)).double()
    assert M.shape == (8, 16) and float((M * M).sum()) == pytest.approx(8.0, rel=1e-6)
    assert torch.allclose(M @ M.T, torch.eye(8, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(M[:, 8:], M[:, :8] @ block_rotation(0.5), atol=1e-6)
    with pytest.raises(BadInputError, match="LQ-24/12"):
        block_hadamard_start(LatticeConfig(24, 12))
    with pytest.raises(BadInputError, match="block magnitude 0.8"):
        block_rotation(0.8)


def test_scale_fit_is_least_squares_and_keeps_the_direction():
    cfg = LatticeConfig(16, 8)
    M = block_hadamard_start(cfg)
    x = gaussian(4096, 8, seed=3)
    signs = encode(x, M, SearchConfig(beam=32)).float() * 2 - 1
    fitted = solve_scale(*normal_equations(x, signs), M)
    c = float(fitted.norm() / M.norm())
    assert torch.allclose(fitted, c * M, rtol=1e-5)

    def err(scale: float) -> float:
        return float(((x - signs @ (scale * M).T) ** 2).sum())

    assert err(c) < err(c * 1.01) and err(c) < err(c * 0.99)
    # Training with fit=scale never leaves the start's direction.
    train = TrainConfig(iterations=0, final_iterations=2, final_samples=4096, init="blocks")
    result = train_matrix(cfg, replace(train, fit="scale"), eval_samples=4096)
    assert torch.allclose(result.matrix / result.matrix.norm(), M / M.norm(), atol=1e-6)
    assert result.manifest_entry()["fit"] == "scale" and "ratio" not in result.manifest_entry()
    full = train_matrix(cfg, train, eval_samples=4096)
    assert not torch.allclose(full.matrix / full.matrix.norm(), M / M.norm(), atol=1e-3)


def test_catalog_16_8_is_the_block_matrix():
    cfg = LatticeConfig(16, 8)
    M = load_catalog_matrix(cfg)
    entry = next(e for e in catalog_manifest()["entries"] if e["name"] == cfg.name)
    assert entry["init"] == "blocks" and entry["fit"] == "scale"
    start = block_hadamard_start(cfg)
    assert torch.allclose(M / M.norm(), start / start.norm(), atol=1e-6)
    assert 0.74 < float(M.norm(dim=0).mean()) < 0.75  # the fitted scale


@pytest.mark.parametrize(
    ("D", "d", "fragment"),
    [(8, 10, "LQ-8/10"), (10, 10, "LQ-10/10"), (33, 10, "at most 32"), (4, 0, "d=0")],
)
def test_bad_config_is_a_clear_error(D, d, fragment):
    with pytest.raises(LatticeConfigError, match=fragment):
        LatticeConfig(D, d)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"beam": 0}, "beam=0"),
        ({"ridge": 0.0}, "ridge=0.0"),
        ({"tail": 9}, "tail=9"),
        ({"chunk": 0}, "chunk=0"),
    ],
)
def test_bad_search_settings_are_clear_errors(kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        SearchConfig(**kwargs)


def test_bad_training_settings_are_clear_errors():
    with pytest.raises(BadInputError, match="init 'lattice'"):
        TrainConfig(init="lattice")
    with pytest.raises(BadInputError, match="LQ-24/10"):
        train_matrix(LatticeConfig(24, 10), TrainConfig(init="hadamard"))
    with pytest.raises(BadInputError, match="fit 'rows'"):
        TrainConfig(fit="rows")
    with pytest.raises(BadInputError, match="LQ-24/12"):
        train_matrix(LatticeConfig(24, 12), TrainConfig(init="blocks"))
    with pytest.raises(BadInputError, match="restarts=0"):
        TrainConfig(restarts=0)
    with pytest.raises(BadInputError, match="memory=1"):
        TrainConfig(memory=1.0)
    with pytest.raises(BadInputError, match="search_beam=0"):
        TrainConfig(search_beam=0)


def test_memory_pools_the_normal_equations_of_earlier_steps():
    """memory=0 is plain Lloyd (each step the least-squares M of its own sample); memory
    pools from the second final step on: the steps differ, stay deterministic, and still
    lower the training MSE."""
    cfg = LatticeConfig(12, 6)
    plain = TrainConfig(iterations=2, samples=2048, final_iterations=2, final_samples=2048, seed=5)
    pooled = replace(plain, memory=0.9)
    a, b = train_matrix(cfg, plain, eval_samples=2048), train_matrix(cfg, pooled, eval_samples=2048)
    assert a.history[:4] == b.history[:4]  # the first pooled step is the fourth
    assert not torch.equal(a.matrix, b.matrix)
    again = train_matrix(cfg, pooled, eval_samples=2048)
    assert torch.equal(b.matrix, again.matrix)
    assert b.history[-1] < b.history[0]
    # The plain step is exactly least squares on its sample.
    g = torch.Generator().manual_seed(5 * 1000)
    M = orthonormal_rows(cfg, g)
    x = torch.randn(2048, cfg.d, generator=g)
    one = train_matrix(cfg, TrainConfig(iterations=1, samples=2048, seed=5), eval_samples=256)
    signs = encode(x, M, SearchConfig(beam=32)).float() * 2 - 1
    assert torch.allclose(one.matrix, least_squares_matrix(x, signs), atol=1e-6)


def test_polish_steps_use_the_polish_beam_and_are_counted():
    cfg = LatticeConfig(12, 6)
    train = TrainConfig(iterations=2, samples=1024, polish_iterations=2, polish_beam=4, seed=2)
    steps = []
    result = train_matrix(cfg, train, lambda done, total: steps.append((done, total)), 2048)
    assert steps[-1] == (4, 4) and len(result.history) == 4
    entry = result.manifest_entry()
    assert (entry["polish_iterations"], entry["polish_beam"], entry["search_beam"]) == (2, 4, 64)


def test_unknown_catalog_entry_says_how_to_train_it():
    with pytest.raises(BadInputError) as info:
        load_catalog_matrix(LatticeConfig(31, 9))
    message = str(info.value)
    assert "LQ-31/9" in message and "liftq lattice train --D 31 --d 9" in message
    assert "\n" not in message


def test_mismatched_shapes_are_clear_errors(small_matrix):
    with pytest.raises(BadInputError, match="width 5"):
        encode(torch.zeros(3, 5), small_matrix)
    with pytest.raises(BadInputError, match="width 11"):
        decode(torch.zeros(3, 11, dtype=torch.bool), small_matrix)
    with pytest.raises(BadInputError, match="not \\(d, D\\)"):
        encode(torch.zeros(3, 6), small_matrix.T)
