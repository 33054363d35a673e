"""Quality against size as a picture: bits per weight against perplexity, one panel per text.

Rows are the quality bench's (`bench/results/quality.json`: id, method, bits_per_weight, ppl
per text). Every measured row is one marker; liftq's rows are joined as curves (plain,
fine-tuned), each peer row is labelled with its id, and the full-precision row is a dashed
line. Perplexity is on a log axis cut at CEILING x the fp perplexity: rows above it (2-bit RTN
and HQQ reach 10^5 to 10^6) sit on the top edge and are listed with their values in a corner,
so one broken peer does not flatten everything else. An optional highlighted point (a pushed
model's own measurement, `liftq push --compare`) is drawn as a star over the rest.

Used by bench/quality_plot.py (the bench's PNG) and hub/compare.py (the model card's).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

CEILING = 4.0  # the top of the axis, in multiples of the fp perplexity
PEER_MARKERS = {"rtn": "v", "gptq": "s", "hqq": "D", "llamacpp": "^", "autoround": "P"}


@dataclass(frozen=True)
class Point:
    """One model drawn over the rows: its label, bits per weight and perplexity per text."""

    label: str
    bits_per_weight: float
    ppl: dict[str, float] = field(default_factory=dict)


def measured(rows: list[dict], text: str) -> list[dict]:
    """The rows with a perplexity on `text` and a bits/w figure."""
    return [r for r in rows if (r.get("ppl") or {}).get(text) and r.get("bits_per_weight")]


def fp_ppl(rows: list[dict], text: str) -> float | None:
    return next((r["ppl"][text] for r in measured(rows, text) if r["method"] == "fp"), None)


def liftq_curves(rows: list[dict], text: str) -> dict[str, list[tuple[float, float, str]]]:
    """liftq's rows on `text` as curves {name: [(bits/w, ppl, id)] sorted by bits}: the plain
    rows and the fine-tuned (-ft) ones; mixed and other variants are single markers."""
    curves: dict[str, list[tuple[float, float, str]]] = {"liftq": [], "liftq + fine-tuning": []}
    for row in measured(rows, text):
        if row["method"] != "liftq" or "-mixed" in row["id"]:
            continue
        name = "liftq + fine-tuning" if row["id"].endswith("-ft") else "liftq"
        if row["id"].count("-") > (2 if name == "liftq + fine-tuning" else 1):
            continue  # e.g. liftq-3.0-ft96: a variant, not a point of the curve
        curves[name].append((row["bits_per_weight"], row["ppl"][text], row["id"]))
    return {k: sorted(v) for k, v in curves.items() if v}


def axis_top(rows: list[dict], text: str) -> float:
    """The top of the perplexity axis on `text`: CEILING x fp, or the highest row without fp."""
    fp = fp_ppl(rows, text)
    return CEILING * fp if fp else max(r["ppl"][text] for r in measured(rows, text))


def off_chart(rows: list[dict], text: str) -> list[str]:
    """The rows above the axis on `text`, as the lines the panel lists them with."""
    top = axis_top(rows, text)
    return [f"{r['id']} ({r['bits_per_weight']:.2f} b/w): {r['ppl'][text]:,.0f}"
            for r in measured(rows, text) if r["ppl"][text] > top]  # fmt: skip


def _panel(ax, rows: list[dict], text: str, point: Point | None) -> None:
    fp = fp_ppl(rows, text)
    top = axis_top(rows, text)
    curves = liftq_curves(rows, text)
    for name, points in curves.items():
        xs, ys, _ = zip(*points, strict=True)
        ax.plot(xs, ys, "o-", lw=2, ms=6, label=name, zorder=3)
    on_curves = {p[2] for c in curves.values() for p in c}
    for row in measured(rows, text):
        if row["method"] == "fp" or row["id"] in on_curves:
            continue
        ppl, bits = row["ppl"][text], row["bits_per_weight"]
        marker = PEER_MARKERS.get(row["method"], "o")
        variant = row["method"] == "liftq"
        color = "tab:green" if variant else "0.35"
        ax.scatter([bits], [min(ppl, top)], marker=marker, s=40, color=color, zorder=2,
                   label="liftq variants" if variant else None)  # fmt: skip
        if ppl <= top and not variant:
            ax.annotate(row["id"], (bits, ppl), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)  # fmt: skip
    if point is not None and text in point.ppl:
        ppl = point.ppl[text]
        ax.scatter([point.bits_per_weight], [min(ppl, top)], marker="*", s=260, color="tab:red",
                   edgecolors="black", linewidths=0.6, zorder=5, label=point.label)  # fmt: skip
        ax.annotate(f"{point.label}: {ppl:.2f}", (point.bits_per_weight, min(ppl, top)),
                    textcoords="offset points", xytext=(8, -14), fontsize=8, color="tab:red",
                    weight="bold", zorder=6,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.85})  # fmt: skip
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


def render_png(
    rows: list[dict], texts: list[str], title: str, point: Point | None = None, dpi: int = 110
) -> bytes:
    """The PNG bytes of one panel per text (side by side), `point` starred where it has a
    perplexity. Rows without a number on a text are left out of that panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6.4 * len(texts), 5.2), squeeze=False)
    try:
        for ax, text in zip(axes[0], texts, strict=True):
            _panel(ax, rows, text, point)
        fig.suptitle(title)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()
