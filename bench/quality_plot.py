"""The quality bench's picture: bits per weight against perplexity, one panel per text.

The drawing is liftq's own (liftq_cli.evaluate.pareto, which `liftq push --compare` also uses
for a model card): liftq's rows joined as curves, peers labelled, fp as a dashed line, rows
above 4x fp listed on the top edge. Written by bench/quality.py beside quality.md; also
runnable alone:

    python bench/quality_plot.py [--results bench/results/quality.json] [--out ...png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from liftq_cli.evaluate.pareto import liftq_curves, off_chart, render_png  # noqa: E402

__all__ = ["liftq_curves", "off_chart", "write_plot"]


def write_plot(rows: list[dict], texts: list[str], path: Path, title: str) -> Path:
    """Draw one panel per text (liftq_cli.evaluate.pareto) and write the PNG atomically."""
    from liftq_cli.io.atomic import atomic_file

    png = render_png(rows, texts, title)
    with atomic_file(path) as tmp:
        tmp.write_bytes(png)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/quality.json")
    parser.add_argument("--out", type=Path, default=None, help="default: beside --results")
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    texts = list(data["protocol"]["texts"]) if "texts" in data.get("protocol", {}) else None
    texts = texts or sorted({t for r in data["rows"] for t in (r.get("ppl") or {})})
    out = args.out or args.results.with_suffix(".png")
    write_plot(data["rows"], texts, out, f"Quality bench: {data['model']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
