import pytest
import torch

from liftq_cli.data.calibration import calibration_set, sample_windows, tokenize
from liftq_cli.data.text import load_text, load_wikitext2
from liftq_cli.errors import BadInputError


def test_wikitext2_rows_follow_the_protocol():
    text = load_wikitext2()
    assert text.is_eval_set
    rows = text.text.split("\n\n")
    assert len(rows) == 2891  # one non-empty row per line of wiki.test.raw (see its README)
    assert rows[0] == " = Robert Boulter = "
    assert text.origin.endswith("wiki.test.raw")


def test_wikitext2_data_dir_and_env(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="has no wiki.test.raw"):
        load_wikitext2(tmp_path)
    (tmp_path / "wiki.test.raw").write_text("first row\nsecond row\n")
    assert load_wikitext2(tmp_path).text == "first row\n\nsecond row"
    monkeypatch.setenv("LIFTQ_DATA", str(tmp_path))
    assert load_text("wikitext2").text == "first row\n\nsecond row"


def test_wiki_excerpt_is_clean_plain_text():
    text = load_text("wiki")
    assert not text.is_eval_set
    assert text.text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert 2_500_000 < len(text.text) < 3_500_000
    for markup in ("'''", "[[", "]]", "{{", "<ref", "==Etymology"):
        assert markup not in text.text, markup


def test_local_file_and_bad_names(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello calibration", encoding="utf-8")
    text = load_text(str(path))
    assert text.text == "hello calibration" and not text.is_eval_set
    with pytest.raises(BadInputError, match="unknown text source 'wikitext3'"):
        load_text("wikitext3")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(BadInputError, match="not UTF-8"):
        load_text(str(binary))


def test_sampler_is_seeded_and_disjoint():
    ids = torch.arange(10_000)
    a = sample_windows(ids, 8, 128, seed=0)
    assert a.shape == (8, 128)
    assert torch.equal(a, sample_windows(ids, 8, 128, seed=0))
    assert not torch.equal(a, sample_windows(ids, 8, 128, seed=1))
    starts = sorted(int(row[0]) for row in a)
    assert all(s % 128 == 0 for s in starts)
    assert all(b - s >= 128 for s, b in zip(starts, starts[1:], strict=False))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 127, dtype=a.dtype))


def test_sampler_refuses_too_little_text():
    with pytest.raises(BadInputError, match="fewer than --nsamples 10 x --seqlen 128 = 1280"):
        sample_windows(torch.arange(1000), 10, 128, seed=0)


def test_calibration_refuses_evaluation_sets(tokenizer, tmp_path):
    with pytest.raises(BadInputError, match="evaluation set"):
        calibration_set(load_wikitext2(), tokenizer, 4, 64, seed=0)
    copy = tmp_path / "wiki.test.raw"
    copy.write_text("x " * 1000)
    with pytest.raises(BadInputError, match="evaluation set"):
        calibration_set(load_text(str(copy)), tokenizer, 4, 64, seed=0)


def test_calibration_from_wiki_is_reproducible(tokenizer):
    wiki = load_text("wiki")
    a = calibration_set(wiki, tokenizer, 4, 256, seed=3)
    b = calibration_set(wiki, tokenizer, 4, 256, seed=3)
    assert a.input_ids.shape == (4, 256) and a.fingerprint == b.fingerprint
    ids = tokenize(tokenizer, wiki.text)
    assert 600_000 < ids.numel() < 900_000  # about 700k tokens once cleaned
