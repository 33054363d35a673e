"""`liftq push --compare quality.json`: the pushed model's own point on the quality bench.

The bench (`bench/quality.py`) measures liftq and its peers on one base model with one
protocol and writes `quality.json`. A folder to push carries its bits per weight (the same
count as the bench's: packed codes, scales, whitening and each lattice matrix once, over the
decoder linears; `card.quantization`) and its `liftq eval --json` results. The point is only
placed when the two are comparable: the same base model, and an eval with the bench's context,
token count and no BOS on a text the bench measured. Anything else is refused with the fix,
since a point measured another way would mislead the reader of the card.

The card gets a section with the picture (`evaluate.pareto`, uploaded beside README.md as
COMPARE_PNG) and a table of the model against the bench's rows near its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liftq_cli.data.text import KNOWN
from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.pareto import Point, fp_ppl, render_png
from liftq_cli.hub.folder import BUNDLED_BASES, HUB_ID, FolderInfo, _read_json

COMPARE_PNG = "liftq_quality.png"
NEAR_BITS = 0.75  # the table lists bench rows within this many bits/w of the model
_FIX = "pass the quality.json that `python bench/quality.py` wrote (bench/results/quality.json)"


@dataclass(frozen=True)
class Comparison:
    """The model's point, the bench it sits on, and the texts they share."""

    point: Point
    bench: dict[str, Any]
    texts: list[str]
    source: str  # the bench file's name, for the card

    def png(self) -> bytes:
        title = f"{self.point.label} on the liftq quality bench ({self.bench['model']})"
        return render_png(self.bench["rows"], self.texts, title, self.point)


def read_bench(path: Path) -> dict[str, Any]:
    """Load a quality bench result, checking the fields the comparison reads."""
    path = Path(path).expanduser()
    if not path.is_file():
        state = "is a folder" if path.is_dir() else "does not exist"
        raise BadInputError(f"--compare '{path}' {state}: {_FIX}")
    data = _read_json(path, "--compare file", _FIX)
    protocol = data.get("protocol")
    rows = data.get("rows")
    if (
        not isinstance(data.get("model"), str)
        or not isinstance(protocol, dict)
        or not isinstance(protocol.get("ctx"), int)
        or not isinstance(rows, list)
        or not all(isinstance(r, dict) and "id" in r and "method" in r for r in rows)
    ):
        raise BadInputError(
            f"--compare '{path}' is not a quality bench result (no model, protocol.ctx and "
            f"rows with id and method): {_FIX}"
        )
    return data


def _hub_id(spec: str) -> str | None:
    if spec in BUNDLED_BASES:
        return BUNDLED_BASES[spec].repo_id
    return spec if HUB_ID.match(spec) else None


def _bench_texts(bench: dict[str, Any]) -> list[str]:
    listed = bench["protocol"].get("texts")
    if isinstance(listed, list) and listed:
        return [str(t) for t in listed]
    return sorted({t for r in bench["rows"] for t in (r.get("ppl") or {})})


def _matches(run: dict[str, Any], bench: dict[str, Any]) -> bool:
    """Whether an eval run used the bench's protocol: windows of its ctx, its token count,
    no BOS (the bench's evaluator, `evaluate.perplexity`, adds none)."""
    p, b = run.get("protocol") or {}, bench["protocol"]
    return (
        p.get("ctx") == b["ctx"]
        and p.get("stride", p.get("ctx")) == b["ctx"]
        and p.get("max_tokens") == b.get("max_tokens")
        and not p.get("bos")
    )


def compare(
    info: FolderInfo, bench: dict[str, Any], base_id: str | None, bits: float | None, source: str
) -> Comparison:
    """The folder's point on `bench`, or a BadInputError saying why it cannot be placed.

    bits: the folder's stored bits per weight (`card.quantization(info).stored_bits`).
    """
    bench_base = _hub_id(bench["model"])
    if base_id is None:
        raise BadInputError(
            f"--compare: the base model of '{info.folder}' is unknown, so it cannot be checked "
            f"against the bench's ({bench['model']}): pass --base-model owner/name"
        )
    if bench_base != base_id:
        raise BadInputError(
            f"--compare '{source}' measured {bench['model']} ({bench_base or 'no hub id'}), "
            f"but this folder is quantized from {base_id}: run the quality bench on "
            f"{base_id} or drop --compare"
        )
    if bits is None:
        raise BadInputError(
            f"--compare: the bits per weight of '{info.folder}' cannot be counted (config.json "
            "or the per-linear lattice configs are unreadable): re-run `liftq pack`"
        )
    texts = _bench_texts(bench)
    ppl: dict[str, float] = {}
    for run in info.evals:
        if _matches(run, bench):
            for text, value in (run.get("ppl") or {}).items():
                if text in texts and isinstance(value, (int, float)):
                    ppl.setdefault(text, float(value))
    if not ppl:
        b = bench["protocol"]
        named = [t for t in texts if t in KNOWN] or ["wikitext2"]  # what `liftq eval` loads
        cmd = f"liftq eval {info.folder} --ppl {','.join(named)} --ctx {b['ctx']}"
        cmd += f" --max-tokens {b['max_tokens']}" if b.get("max_tokens") else ""
        raise BadInputError(
            f"--compare: no attached eval used the bench's protocol (ctx {b['ctx']}, first "
            f"{b.get('max_tokens') or 'all'} tokens, no BOS, on {', '.join(texts)}): run "
            f"`{cmd} --json > {info.folder}/liftq_eval.json`"
        )
    shared = [t for t in texts if t in ppl]
    return Comparison(Point("this model", bits, ppl), bench, shared, source)


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def compare_section(c: Comparison) -> list[str]:
    """The card's lines: the picture, a table of the model among the bench rows within
    NEAR_BITS bits/w of it (and fp), and where the bench's numbers come from."""
    b = c.bench
    p = b["protocol"]
    head = "| | method | bits/w | " + " | ".join(f"{t} ppl" for t in c.texts) + " |"
    lines = [
        f"This model's point among the rows of liftq's quality bench on {b['model']} (the "
        f"same protocol: ctx {p['ctx']}, first {p.get('max_tokens') or 'all'} tokens of each "
        "text, no BOS; bits per weight over the decoder linears with every overhead). Lower "
        "and further left is better.",
        "",
        f"![bits per weight against perplexity]({COMPARE_PNG})",
        "",
        head,
        "|---|---|---:|" + "---:|" * len(c.texts),
    ]

    def row_line(name: str, method: str, bits: float, ppl: dict[str, Any]) -> str:
        cells = " | ".join(_num(ppl.get(t)) for t in c.texts)
        return f"| {name} | {method} | {bits:.3f} | {cells} |"

    rows = [
        r
        for r in b["rows"]
        if r.get("status", "ok") == "ok"
        and isinstance(r.get("bits_per_weight"), (int, float))
        and any((r.get("ppl") or {}).get(t) for t in c.texts)
        and (
            r["method"] == "fp" or abs(r["bits_per_weight"] - c.point.bits_per_weight) <= NEAR_BITS
        )
    ]
    entries = [(r["bits_per_weight"], 1, row_line(r["id"], r["method"], r["bits_per_weight"],
                                                   r.get("ppl") or {})) for r in rows]  # fmt: skip
    mine = row_line("**this model**", "liftq", c.point.bits_per_weight, c.point.ppl)
    entries.append((c.point.bits_per_weight, 0, mine))
    lines += [line for _, _, line in sorted(entries, key=lambda e: (e[0], e[1]))]
    fp = {t: fp_ppl(b["rows"], t) for t in c.texts}
    calib = b.get("calibration") or {}
    versions = b.get("versions") or {}
    note = (
        f"- Bench rows from `{c.source}` (liftq {versions.get('liftq', '?')}): rows within "
        f"{NEAR_BITS} bits/w of this model and the fp reference"
        + "".join(f"; fp {t} {v:.2f}" for t, v in fp.items() if v)
    )
    if calib:
        note += (
            f"; calibration {calib.get('text')}: {calib.get('nsamples')} windows × "
            f"{calib.get('seqlen')} tokens"
        )
    return lines + ["", note + "."]
