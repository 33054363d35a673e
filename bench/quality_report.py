"""Rows of the quality bench and how they are shown: the table, Markdown, JSON and the
regression check (a liftq row may not be worse than the best peer at fewer or equal bits).
Pure functions of row records: the caller prints and writes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

TEXTS = ("wikitext2", "wiki", "shakespeare")  # bench/texts.py: the third, neither of the two


@dataclass
class Row:
    """One method x setting. status: ok | failed | unavailable (reason says why)."""

    id: str
    method: str
    setting: str
    status: str = "pending"
    reason: str = ""
    bits_per_weight: float | None = None  # quantized decoder linears, all overhead included
    total_bytes: int | None = None
    ppl: dict[str, float] = field(default_factory=dict)
    quant_seconds: float | None = None  # the quantization call itself
    child_seconds: float | None = None  # the whole child process (imports, model load, save)
    peak_rss_mb: float | None = None  # of the quantization child (its descendants included)
    bits_rule: str = ""
    library: str = ""
    reused: bool = False  # quantization taken from an earlier run's work dir
    eval_seconds: float | None = None
    eval_reused: bool = False  # perplexities taken from an earlier run on the same weights
    origin: str = ""  # set on rows merged from an earlier run's results (--merge)

    def as_dict(self) -> dict:
        return asdict(self)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def table_rows(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells shared by the terminal table and the Markdown file."""
    header = [
        "row",
        "method",
        "setting",
        "bits/w",
        "total MB",
        *(f"ppl {t}" for t in TEXTS),
        "quant s",
        "peak RSS MB",
        "status",
    ]
    cells = []
    for r in rows:
        status = "ok" if r.status == "ok" else f"{r.status}: {r.reason}"
        if r.status == "ok" and r.reused:
            status = "ok (quantization reused)"
        if r.origin:
            status = f"{status}, {r.origin}"
        cells.append(
            [
                r.id,
                r.method,
                r.setting,
                _num(r.bits_per_weight, "%.3f"),
                _num(None if r.total_bytes is None else r.total_bytes / 1e6, "%.1f"),
                *(_num(r.ppl.get(t), "%.2f") for t in TEXTS),
                _num(r.quant_seconds, "%.1f"),
                _num(r.peak_rss_mb, "%.0f"),
                status,
            ]
        )
    return header, cells


def markdown(rows: list[Row], header_lines: list[str]) -> str:
    header, cells = table_rows(rows)

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    out = [*header_lines, "", line(header), line(["---"] * len(header))]
    out += [line(c) for c in cells]
    out += ["", "### How each row's bits were counted", ""]
    for r in rows:
        if r.bits_rule or r.library:
            out.append(f"- `{r.id}`: {r.bits_rule} ({r.library})")
    return "\n".join(out) + "\n"


def regressions(rows: list[Row], texts: tuple[str, ...] = TEXTS) -> tuple[list[str], list[str]]:
    """(failures, notes): a liftq row fails when, on any of `texts`, some peer row at fewer or
    equal effective bits per weight has a lower perplexity. Peers: every quantized row that ran
    and is neither liftq nor fp (the RTN floor included: losing to it is a regression too)."""
    peers = [r for r in rows if r.status == "ok" and r.method not in ("liftq", "fp")]
    liftq = [r for r in rows if r.method == "liftq"]
    measured = [r for r in liftq if r.status == "ok" and r.bits_per_weight is not None]
    if not measured:
        why = "; ".join(f"{r.id}: {r.reason}" for r in liftq) or "no liftq rows selected"
        return [], [f"regression check: no liftq row measured ({why}); nothing to compare"]
    failures, notes = [], []
    for r in measured:
        assert r.bits_per_weight is not None
        for text in texts:
            rivals = [
                p
                for p in peers
                if p.bits_per_weight is not None
                and p.bits_per_weight <= r.bits_per_weight + 1e-9
                and text in p.ppl
            ]
            if not rivals or text not in r.ppl:
                notes.append(f"{r.id}: no peer at <= {r.bits_per_weight:.3f} bits/w on {text}")
                continue
            best = min(rivals, key=lambda p: p.ppl[text])
            verdict = (
                f"{r.id} ({r.bits_per_weight:.3f} bits/w) {text} ppl {r.ppl[text]:.3f} vs best "
                f"peer {best.id} ({best.bits_per_weight:.3f} bits/w) {best.ppl[text]:.3f}"
            )
            if r.ppl[text] > best.ppl[text]:
                failures.append("REGRESSION " + verdict)
            else:
                notes.append("ok " + verdict)
    return failures, notes
