"""The quality bench's Pareto plot: which rows join liftq's curves, and a PNG with one panel per
text where rows above the axis are listed rather than dropped. Fast, synthetic rows."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.quality_plot import liftq_curves, off_chart, write_plot

from bench import texts as bench_texts


def row(id_: str, method: str, bits: float, **ppl: float) -> dict:
    return {"id": id_, "method": method, "bits_per_weight": bits, "ppl": ppl}


ROWS = [
    row("fp", "fp", 32.0, wikitext2=24.4, shakespeare=30.0),
    row("liftq-3.0", "liftq", 3.1, wikitext2=30.0, shakespeare=40.0),
    row("liftq-2.4", "liftq", 2.5, wikitext2=38.0, shakespeare=50.0),
    row("liftq-2.4-ft", "liftq", 2.5, wikitext2=35.0),
    row("liftq-3.0-ft96", "liftq", 3.1, wikitext2=29.0),
    row("liftq-2.4-mixed", "liftq", 2.5, wikitext2=37.0),
    row("gptq-2bit-g64", "gptq", 2.3, wikitext2=6438.0),
    row("rtn-4bit", "rtn", 4.3, wikitext2=26.0),
    row("hqq-2bit", "hqq", 2.6, wikitext2=None),
]


def test_curves_join_plain_and_fine_tuned_rows_by_bits_and_leave_variants_out():
    curves = liftq_curves(ROWS, "wikitext2")
    assert curves == {
        "liftq": [(2.5, 38.0, "liftq-2.4"), (3.1, 30.0, "liftq-3.0")],
        "liftq + fine-tuning": [(2.5, 35.0, "liftq-2.4-ft")],
    }
    # A text only some rows were evaluated on: the curve has only those rows.
    assert liftq_curves(ROWS, "shakespeare") == {
        "liftq": [(2.5, 50.0, "liftq-2.4"), (3.1, 40.0, "liftq-3.0")]
    }


def test_plot_is_a_png_with_one_panel_per_text(tmp_path: Path):
    from PIL import Image

    out = write_plot(ROWS, ["wikitext2", "shakespeare"], tmp_path / "q.png", "test")
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 1.8 * height  # two panels side by side
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_rows_above_four_times_fp_are_listed_not_dropped():
    assert off_chart(ROWS, "wikitext2") == ["gptq-2bit-g64 (2.30 b/w): 6,438"]
    assert off_chart(ROWS, "shakespeare") == []


def test_third_text_is_a_fixed_join_of_the_pinned_sdist(tmp_path: Path, monkeypatch):
    # No download in tests: a corrupt sdist in the work folder is refused by its SHA-256.
    (tmp_path / bench_texts.SDIST).write_bytes(b"not the sdist")
    with pytest.raises(SystemExit, match="SHA-256"):
        bench_texts.shakespeare_path(tmp_path)
    assert not (tmp_path / "shakespeare-tragedies.txt").exists()
    assert bench_texts.text_source("wiki") == "wiki"
