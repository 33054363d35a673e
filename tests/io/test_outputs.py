"""io/outputs.py and io/atomic.py: outputs never replace what liftq did not write, stale
temporary folders of interrupted writes are cleaned up, and outputs get the umask's modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import atomic_dir, atomic_file
from liftq_cli.io.outputs import check_output, clean_stale, recognise
from liftq_cli.io.workdir import WorkDir


def quantize_output(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "liftq.json").write_text(json.dumps({"format_version": 2, "layers": {}}))
    return folder


def test_a_new_or_empty_path_is_fine_and_nothing_is_created(tmp_path):
    assert (
        check_output(tmp_path / "new" / "deeper", "--out", "quantize")
        == tmp_path / "new" / "deeper"
    )
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "--out", "pack")


def test_only_own_outputs_are_replaced_and_only_with_overwrite(tmp_path):
    ours = quantize_output(tmp_path / "q")
    with pytest.raises(BadInputError, match="holds a `liftq quantize` output folder: pass --over"):
        check_output(ours, "--out", "quantize")
    check_output(ours, "--out", "quantize", overwrite=True)
    with pytest.raises(BadInputError, match="not a `liftq pack` output"):
        check_output(ours, "--out", "pack", overwrite=True)  # another command's output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hi")
    with pytest.raises(BadInputError, match="liftq replaces only its own outputs"):
        check_output(foreign, "--out", "quantize", overwrite=True)
    assert (foreign / "notes.txt").read_text() == "hi"


@pytest.mark.parametrize(
    ("out", "inp", "said"),
    [("m", "m", "is the input"), ("m/o", "m", "is inside the input"), (".", "m", "contains")],
)
def test_an_output_overlapping_an_input_is_refused(tmp_path, monkeypatch, out, inp, said):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    with pytest.raises(BadInputError, match=said):
        check_output(tmp_path / out, "--out", "quantize", [tmp_path / inp])


def test_files_and_folders_are_not_mistaken_for_each_other(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_output(tmp_path / "f", "--out", "quantize", overwrite=True)
    with pytest.raises(BadInputError, match="is a folder"):
        check_output(tmp_path, "--save", "eval-report", overwrite=True)
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"ppl": {}, "protocol": {}}))
    assert recognise(report, "eval-report")
    check_output(report, "--save", "eval-report", overwrite=True)
    with pytest.raises(BadInputError, match="pass --overwrite"):
        check_output(report, "--save", "eval-report")


def test_the_root_and_unwritable_places_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="file system root"):
        check_output(tmp_path.anchor, "--out", "quantize")
    with pytest.raises(BadInputError, match="cannot be written"):
        check_output("/proc/liftq-test/out", "--out", "quantize")


def test_stale_temporaries_of_dead_writers_are_cleaned_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = tmp_path / f".out.{pid}.abc123.tmp"
    stale.mkdir()
    live = tmp_path / f".out.{os.getpid()}.def456.tmp"
    live.mkdir()
    moved = tmp_path / f".out.old.{pid}"  # a swap killed between its two renames
    quantize_output(moved)
    other = tmp_path / f".other.{pid}.x.tmp"
    other.mkdir()
    clean_stale(tmp_path / "out")
    assert not stale.exists() and live.exists() and other.exists()
    assert recognise(tmp_path / "out", "quantize") and not moved.exists()  # put back


def test_outputs_get_the_umasks_modes(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "x").write_text("1")
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644


def test_atomic_dir_never_replaces_a_file(tmp_path):
    (tmp_path / "f").write_text("precious")
    with pytest.raises(FileExistsError), atomic_dir(tmp_path / "f") as tmp:
        (tmp / "x").write_text("1")
    assert (tmp_path / "f").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_work_dir_is_held_by_one_job_at_a_time(tmp_path):
    work = WorkDir(tmp_path / "w")
    with (
        work.lock(),
        pytest.raises(
            BadInputError, match=rf"in use by another liftq quantize \(PID {os.getpid()}\)"
        ),
        WorkDir(tmp_path / "w").lock(),
    ):
        pass
    with work.lock():  # released
        pass


def test_a_work_dir_interrupted_before_its_job_file_still_resumes(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / ".lock").write_text("123")
    (work / "sensitivity.json").write_text("{}")  # --mixed measures before the blocks start
    (work / ".block_0000.safetensors.123.x1y2.tmp").write_text("")
    assert recognise(work, "work")
    check_output(work, "--work-dir", "work", overwrite=True)
    (work / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a `liftq quantize` work dir"):
        check_output(work, "--work-dir", "work", overwrite=True)
