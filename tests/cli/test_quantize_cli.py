"""`liftq quantize`: bad input is a one-line error, a non-zero exit and nothing in --out."""

from __future__ import annotations

import pytest
from tests.helpers import assert_one_line_error

from liftq_cli.quant.configs import LatticeConfig
from liftq_cli.quant.run import config_for_bits


def test_bits_pick_the_nearest_catalog_config():
    assert config_for_bits(2.4) == LatticeConfig(24, 10)
    assert config_for_bits(3.0).bits == pytest.approx(3.0)
    # ties go to the lower Gaussian MSE in the catalog manifest
    assert config_for_bits(2.0) == LatticeConfig(32, 16)
    assert config_for_bits(2.5) == LatticeConfig(25, 10)
    assert config_for_bits(2.42) == LatticeConfig(24, 10)


@pytest.mark.parametrize("bits", ["5", "0.5"])
def test_bits_outside_catalog(cli, tmp_path, bits):
    result = cli("quantize", "smollm2-135m", "--bits", bits, "--out", str(tmp_path / "q"))
    assert_one_line_error(result, f"--bits {float(bits)}")
    assert not (tmp_path / "q").exists()


def test_unknown_lattice_config_fails_before_any_work(cli, tmp_path):
    result = cli("quantize", "smollm2-135m", "--config", "LQ-31/9", "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "LQ-31/9")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture(cli, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    out = tmp_path / "q"
    result = cli("quantize", str(tmp_path / "gpt2"), "--bits", "2.4", "--out", str(out))
    assert_one_line_error(result, "gpt2")
    assert not out.exists()


def test_unwritable_out(cli):
    result = cli("quantize", "smollm2-135m", "--bits", "2.4", "--out", "/proc/liftq-out")
    assert_one_line_error(result, "/proc/liftq-out")


@pytest.mark.slow
def test_calibration_file_too_short(cli, tmp_path, smollm2_folder):
    text = tmp_path / "short.txt"
    text.write_text("A few words of calibration text, far fewer than asked for.\n")
    out = tmp_path / "q"
    result = cli(
        "quantize", "smollm2-135m", "--bits", "2.4", "--out", str(out), "--calib", str(text)
    )
    assert_one_line_error(result, "short.txt")
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def test_exactly_one_target(cli, tmp_path):
    result = cli("quantize", "smollm2-135m", "--out", str(tmp_path / "q"))
    assert_one_line_error(result, "exactly one of --bits, --config or --recipe")
