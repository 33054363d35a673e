"""The AutoRound peer rows: their settings, bits as stored, and the weight read back."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from bench.quality_peers import _autoround_grid, _autoround_text_calibration, packed_storage_bits
from bench.quality_specs import AUTOROUND_ITERS, all_specs


def test_autoround_rows_carry_preset_iters_and_average():
    specs = {s.id: s for s in all_specs()}
    plain, mixed = specs["autoround-b2-g64"], specs["autoround-scheme-2.4"]
    assert (plain.method, plain.venv, plain.bits, plain.group) == ("autoround", "peers", 2, 64)
    assert plain.iters == mixed.iters == AUTOROUND_ITERS and plain.target_bits == 0.0
    assert mixed.target_bits == 2.4
    assert {"autoround-b3-g64", "autoround-scheme-3.0"} <= set(specs)  # the four rows
    assert specs["autoround-b3-g64"].bits == 3 and specs["autoround-scheme-3.0"].target_bits == 3.0


class WordTokenizer:
    """Token i is the word w{i}; ids above 90 decode to a word that re-tokenizes as two."""

    def decode(self, ids, clean_up_tokenization_spaces=True):
        return " ".join(f"w{i}" if i <= 90 else f"w{i // 10} w{i % 10}" for i in ids)

    def __call__(self, text, truncation=True, max_length=None):
        ids = [int(w[1:]) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_autoscheme_calibration_is_the_same_windows_as_text(tmp_path):
    # AutoScheme takes only a dataset name or a .json path: each window goes in as text,
    # padded with the next window's start (auto-round drops samples shorter than seqlen).
    calib = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 95, 10, 11]])
    same = _autoround_text_calibration(calib, WordTokenizer(), tmp_path / "c.json")
    texts = json.loads((tmp_path / "c.json").read_text())
    assert texts[0] == "w1 w2 w3 w4 w5 w6 w7 w8" and texts[2].startswith("w9 w9 w5 w10")
    assert same == 2  # window 2 holds id 95, which does not survive the round trip


@pytest.mark.parametrize(
    ("rows", "cols", "bits", "group", "expected"),
    [
        (576, 576, 2, 64, 2 + 16 / 64 + 2 / 64),  # 9 groups, 576 * 2 zero bits packed exactly
        (576, 1536, 4, 64, 4 + 16 / 64 + 4 / 64),
        # 100 columns: 2 groups (the short one pays a full scale), 200 code bits -> 7 int32
        (8, 100, 2, 64, (8 * 7 * 32 + 8 * 2 * 16 + 2 * 32) / 800),
    ],
)
def test_storage_bits_as_the_export_packs_them(rows, cols, bits, group, expected):
    got = packed_storage_bits(rows, cols, bits, group) / (rows * cols)
    assert got == pytest.approx(expected, abs=1e-12)


def _linear(weight, scale, *, bits=2, group=4, sym=True, zp=None):
    return SimpleNamespace(weight=weight, scale=scale, zp=zp, bits=bits, group_size=group, sym=sym)


def test_symmetric_weight_is_decoded_from_codes_and_fp16_scale():
    torch.manual_seed(0)
    codes = torch.randint(-2, 2, (3, 8)).float()  # 2-bit sym: [-2, 1]
    scale = (torch.rand(3, 2) + 0.1).half()
    exact = scale.float().repeat_interleave(4, dim=1) * codes
    # the module's copy is bf16 (coarser than fp16 scale x code): the grid read undoes that
    w, group = _autoround_grid(_linear(exact.bfloat16(), scale), "sym")
    assert group == 4 and torch.equal(w, exact)


def test_asymmetric_weight_subtracts_its_zero_point():
    codes = torch.tensor([[0.0, 1, 2, 3], [3, 3, 0, 1]])
    scale, zp = torch.tensor([[0.5], [0.25]]), torch.tensor([[1.0], [2.0]])
    exact = scale * (codes - zp)
    w, _ = _autoround_grid(_linear(exact, scale, sym=False, zp=zp), "asym")
    assert torch.equal(w, exact)


def test_a_weight_off_the_grid_is_refused():
    scale = torch.ones(1, 1)
    with pytest.raises(AssertionError, match="off grid"):
        _autoround_grid(_linear(torch.tensor([[0.5, 0.0, 1.0, -1.0]]), scale), "half")
    with pytest.raises(AssertionError, match="off grid"):  # a code beyond 2 bits
        _autoround_grid(_linear(torch.tensor([[3.0, 0.0, 1.0, -1.0]]), scale), "wide")
