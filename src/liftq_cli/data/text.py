"""Text sources for calibration and evaluation.

Names:
  * `wikitext2`: the WikiText-2 raw test rows joined with "\\n\\n" (the usual protocol). An
    evaluation set: never used for calibration.
  * `wiki`: the real Wikipedia excerpt shipped in gensim's wheel, cleaned to plain text with
    gensim's own wiki-markup filter (about 700k tokens). The default calibration text.
  * any other value: a local UTF-8 text file.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from liftq_cli.errors import BadInputError
from liftq_cli.io.atomic import cache_dir, write_text_atomic

WIKITEXT_FILE = "wiki.test.raw"
GENSIM_WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CLEANER_VERSION = 1
EVAL_SETS = frozenset({"wikitext2"})
KNOWN = ("wikitext2", "wiki")


@dataclass(frozen=True)
class Text:
    """A loaded text source: its name, where it came from and its content."""

    name: str
    origin: str
    text: str
    is_eval_set: bool


def _wikitext_candidates(data_dir: Path | None) -> list[Path]:
    """Places to look for wiki.test.raw, most explicit first."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("LIFTQ_DATA"):
        roots.append(Path(os.environ["LIFTQ_DATA"]).expanduser())
    # The team's shared copy sits beside the checkout: ../shared/data/wikitext-2.
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in [start, *start.parents]:
            roots.append(parent / "shared" / "data")
    candidates = []
    for root in roots:
        candidates += [root / WIKITEXT_FILE, root / "wikitext-2" / WIKITEXT_FILE]
    return candidates


def _wikitext_from_hf_cache() -> str | None:
    """The test split from a local Hugging Face hub cache (parquet), if one exists."""
    hub = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
    files = sorted(hub.glob("datasets--*wikitext/snapshots/*/wikitext-2-raw-v1/test-*.parquet"))
    if not files or importlib.util.find_spec("pyarrow") is None:
        return None
    import pyarrow.parquet as pq

    rows = pq.read_table(files[0], columns=["text"]).column("text").to_pylist()
    return "\n\n".join(row.strip("\n") for row in rows if row.strip())


def load_wikitext2(data_dir: Path | None = None) -> Text:
    """WikiText-2 raw test: rows (one a line) joined with blank lines."""
    explicit = data_dir is not None
    for path in _wikitext_candidates(data_dir):
        if path.is_file():
            rows = path.read_text(encoding="utf-8").splitlines()
            return Text("wikitext2", str(path), "\n\n".join(r for r in rows if r.strip()), True)
        if explicit:
            raise BadInputError(
                f"--data-dir '{data_dir}' has no {WIKITEXT_FILE}: point it at the folder that "
                f"holds the WikiText-2 raw test split"
            )
    cached = _wikitext_from_hf_cache()
    if cached is not None:
        return Text("wikitext2", "huggingface datasets cache", cached, True)
    raise BadInputError(
        f"WikiText-2 test split not found: pass --data-dir DIR (holding {WIKITEXT_FILE}) "
        f"or set LIFTQ_DATA"
    )


def _clean_wiki_markup(raw: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"^\s*(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)  # headings
    lines = [line.strip() for line in text.splitlines()]
    text = "\n".join(line for line in lines if not line.startswith(("|", "!", "{", "}")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def gensim_wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("text source 'wiki' needs gensim: run `pip install gensim==4.4.0`")
    path = Path(spec.submodule_search_locations[0]) / GENSIM_WIKI
    if not path.is_file():
        raise BadInputError(f"text source 'wiki': {path} is missing; reinstall gensim==4.4.0")
    return path


def load_wiki() -> Text:
    """The Wikipedia excerpt from gensim's wheel as plain text (cleaned once, then cached)."""
    source = gensim_wiki_path()
    key = hashlib.sha256(f"{source.stat().st_size}|v{WIKI_CLEANER_VERSION}".encode()).hexdigest()
    cached = cache_dir() / "text" / f"wiki-{key[:16]}.txt"
    if cached.is_file():
        return Text("wiki", str(source), cached.read_text(encoding="utf-8"), False)
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(source) as handle:
        for title, raw, _ in extract_pages(handle):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean_wiki_markup(raw)
            if len(body) > 200:
                articles.append(f"{title}\n\n{body}")
    text = "\n\n".join(articles)
    write_text_atomic(cached, text)
    return Text("wiki", str(source), text, False)


def load_text(name: str, data_dir: Path | None = None) -> Text:
    """Load a named source (`wikitext2`, `wiki`) or a local text file."""
    if name == "wikitext2":
        return load_wikitext2(data_dir)
    if name == "wiki":
        return load_wiki()
    path = Path(name).expanduser()
    if not path.is_file():
        raise BadInputError(
            f"unknown text source '{name}': use {', '.join(KNOWN)} or a path to a text file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"text file '{name}' is not UTF-8 text: convert it first") from exc
    is_eval = path.name == WIKITEXT_FILE
    return Text(path.name, str(path), text, is_eval)
