"""The quality bench's picture: bits per weight against perplexity, one panel per text.

Every measured row is one marker; liftq's rows are joined as curves (plain, fine-tuned), each
peer row is labelled with its id, and the full-precision row is a dashed line. Perplexity is on
a log axis cut at CEILING x the fp perplexity: rows above it (2-bit RTN and HQQ reach 10^5
to 10^6) sit on the top edge and are listed with their values in a corner, so one broken
peer does not flatten everything else. Written by bench/quality.py beside quality.md; also
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

CEILING = 4.0  # the top of the axis, in multiples of the fp perplexity
PEER_MARKERS = {"rtn": "v", "gptq": "s", "hqq": "D", "llamacpp": "^", "autoround": "P"}


def _measured(rows: list[dict], text: str) -> list[dict]:
    return [r for r in rows if (r.get("ppl") or {}).get(text) and r.get("bits_per_weight")]


def liftq_curves(rows: list[dict], text: str) -> dict[str, list[tuple[float, float, str]]]:
    """liftq's rows on `text` as curves {name: [(bits/w, ppl, id)] sorted by bits}: the plain
    rows and the fine-tuned (-ft) ones; mixed and other variants are single markers."""
    curves: dict[str, list[tuple[float, float, str]]] = {"liftq": [], "liftq + fine-tuning": []}
    for row in _measured(rows, text):
        if row["method"] != "liftq" or "-mixed" in row["id"]:
            continue
        name = "liftq + fine-tuning" if row["id"].endswith("-ft") else "liftq"
        if row["id"].count("-") > (2 if name == "liftq + fine-tuning" else 1):
            continue  # e.g. liftq-3.0-ft96: a variant, not a point of the curve
        curves[name].append((row["bits_per_weight"], row["ppl"][text], row["id"]))
    return {k: sorted(v) for k, v in curves.items() if v}


def axis_top(rows: list[dict], text: str) -> float:
    """The top of the perplexity axis on `text`: CEILING x fp, or the highest row without fp."""
    measured = _measured(rows, text)
    fp = next((r["ppl"][text] for r in measured if r["method"] == "fp"), None)
    return CEILING * fp if fp else max(r["ppl"][text] for r in measured)


def off_chart(rows: list[dict], text: str) -> list[str]:
    """The rows above the axis on `text`, as the lines the panel lists them with."""
    top = axis_top(rows, text)
    return [f"{r['id']} ({r['bits_per_weight']:.2f} b/w): {r['ppl'][text]:,.0f}"
            for r in _measured(rows, text) if r["ppl"][text] > top]  # fmt: skip


def write_plot(rows: list[dict], texts: list[str], path: Path, title: str) -> Path:
    """Draw one panel per text and write the PNG (atomically); returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from liftq_cli.io.atomic import atomic_file

    fig, axes = plt.subplots(1, len(texts), figsize=(6.4 * len(texts), 5.2), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        measured = _measured(rows, text)
        fp = next((r["ppl"][text] for r in measured if r["method"] == "fp"), None)
        top = axis_top(rows, text)
        for name, points in liftq_curves(rows, text).items():
            xs, ys, _ = zip(*points, strict=True)
            ax.plot(xs, ys, "o-", lw=2, ms=6, label=name, zorder=3)
        on_curves = {p[2] for c in liftq_curves(rows, text).values() for p in c}
        for row in measured:
            if row["method"] == "fp" or row["id"] in on_curves:
                continue
            ppl, bits = row["ppl"][text], row["bits_per_weight"]
            marker = PEER_MARKERS.get(row["method"], "o")
            variant = row["method"] == "liftq"
            color = "tab:green" if variant else "0.35"
            ax.scatter([bits], [min(ppl, top)], marker=marker, s=40, color=color, zorder=2,
                       label="liftq variants (mixed)" if variant else None)  # fmt: skip
            if ppl <= top and not variant:
                ax.annotate(row["id"], (bits, ppl), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=color)  # fmt: skip
        if listed := off_chart(rows, text):
            ax.text(0.02, 0.2, "on the top edge, perplexity above the axis:\n"
                    + "\n".join(listed), transform=ax.transAxes, fontsize=6.5,
                    va="bottom", color="0.3")  # fmt: skip
        if fp:
            ax.axhline(fp, ls="--", color="0.5", lw=1)
            ax.annotate(f"fp32 {fp:.2f}", (ax.get_xlim()[0], fp), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color="0.4")  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.75 * fp if fp else None, top=top * 1.08)
        ax.set_xlabel("bits per weight (decoder linears, all overheads)")
        ax.set_ylabel(f"perplexity, {text} (log)")
        ax.set_title(text)
        ax.grid(True, which="both", alpha=0.25)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
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
