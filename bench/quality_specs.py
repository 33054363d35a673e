"""The quality bench's protocol and its rows: what each row runs (`Spec`), the full list in
table order (`all_specs`) and the `--rows` selection. No I/O: the constants name where the
bench reads and writes, the other modules do it."""

from __future__ import annotations

import fnmatch
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
CTX = 1024
FULL_TOKENS = 40960
QUICK_TOKENS = 4096
# Calibration windows are drawn after this many `wiki` tokens, so they never overlap the
# `wiki` evaluation prefix, whatever --max-tokens is (quick and full runs share them).
CALIB_OFFSET = FULL_TOKENS
PEER_VENV = ROOT / "bench" / ".venv-peers"
WORK = ROOT / "bench" / "work" / "quality"
RESULTS = ROOT / "bench" / "results"
CHILD = ROOT / "bench" / "quality_peers.py"
CHILD_CODE = (CHILD, ROOT / "bench" / "quality_rtn.py")
CHILD_TIMEOUT_S = 3 * 3600
FINETUNE_STEPS = 48  # liftq -ft rows: 4 fresh windows per step (FinetuneConfig.batch)
LONG_FINETUNE_STEPS, LONG_FINETUNE_LR = 96, 2e-3  # the -ft96 row
AUTOROUND_ITERS = 200  # auto-round's default steps per block (its "best" recipe: 1000)
# liftq-only fields, left out of the peer rows' keys
LIFTQ_ONLY = ("finetune_steps", "finetune_lr", "mixed", "correction_loss", "variant")
# liftq rows with one block-stage change against liftq-2.4: their `liftq quantize` flags
VARIANTS = {
    "staged": ["--true-sequential"],  # dataflow stages (quant/block_encode.py)
    "compensated": ["--true-sequential", "--compensate"],
    "rotations": ["--whiten-rotations", "trained"],  # Cayley P1, P2 (quant/whitening.py)
}
LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


@dataclass(frozen=True)
class Spec:
    """What one row runs. venv: 'product' (this interpreter) or 'peers'."""

    id: str
    method: str
    setting: str
    venv: str = "product"
    bits: int = 0
    group: int = 0
    ftype: str = ""
    target_bits: float = 0.0  # liftq rows: the requested bit-width; autoround: AutoScheme avg
    finetune_steps: int = 0  # liftq -ft rows: `--finetune-steps` (block stage shared)
    finetune_lr: float = 0.0  # liftq rows: `--finetune-lr` when set (else the CLI default)
    mixed: bool = False  # liftq -mixed rows: `--mixed` (same average bits, spread by sensitivity)
    iters: int = 0  # autoround rows: tuning steps per block (its default, 200)
    correction_loss: str = ""  # liftq rows: `--correction-loss` when set (else the default)
    variant: str = ""  # liftq rows: VARIANTS' flags when set (else the default block stage)


def all_specs() -> list[Spec]:
    specs = [Spec("fp", "fp", "de-quantized fp32 (reference)")]
    for bits in (2, 3, 4):
        for group in (64, 128):
            setting = f"{bits}-bit g{group} min/max"
            specs.append(Spec(f"rtn-b{bits}-g{group}", "rtn", setting, "product", bits, group))
    for bits in (2, 3):
        specs.append(Spec(f"gptq-b{bits}-g64", "gptq", f"{bits}-bit g64 asym", "peers", bits, 64))
    for bits in (2, 3):
        specs.append(Spec(f"hqq-b{bits}-g64", "hqq", f"{bits}-bit g64", "peers", bits, 64))
    for bits, avg in ((2, 0.0), (3, 0.0), (2, 2.4), (2, 3.0)):  # presets; AutoScheme mixes
        if avg:
            setting = f"AutoScheme avg_bits {avg} (W2A16G64 / W4A16G64), {AUTOROUND_ITERS} iters"
            row_id = f"autoround-scheme-{avg}"
        else:
            setting = f"W{bits}A16G64 ({bits}-bit g64 sym), {AUTOROUND_ITERS} iters"
            row_id = f"autoround-b{bits}-g64"
        specs.append(
            Spec(row_id, "autoround", setting, "peers", bits, 64, target_bits=avg,
                 iters=AUTOROUND_ITERS)
        )  # fmt: skip
    for ftype, nominal in (("IQ2_XS", 2.31), ("IQ2_S", 2.5), ("IQ2_M", 2.7), ("IQ3_XXS", 3.06)):
        setting = f"{ftype} ({nominal} nominal) + imatrix"
        specs.append(Spec(f"llamacpp-{ftype}", "llamacpp", setting, "peers", ftype=ftype))
    for bits in (2.0, 2.4, 2.5, 3.0):
        specs.append(Spec(f"liftq-{bits:.1f}", "liftq", f"{bits:.1f} bits", target_bits=bits))
    for bits in (2.0, 2.4, 2.5, 3.0):
        setting = f"{bits:.1f} bits + {FINETUNE_STEPS}-step fine-tuning"
        specs.append(
            Spec(
                f"liftq-{bits:.1f}-ft",
                "liftq",
                setting,
                target_bits=bits,
                finetune_steps=FINETUNE_STEPS,
            )
        )
    specs.append(  # the correction's loss, one change against liftq-2.4
        Spec("liftq-2.4-token", "liftq", "2.4 bits, correction loss token",
             target_bits=2.4, correction_loss="token")
    )  # fmt: skip
    for variant, setting in (  # one block-stage change against liftq-2.4
        ("staged", "2.4 bits, linears encoded in dataflow stages"),
        ("compensated", "2.4 bits, in stages, each toward the full-precision output"),
        ("rotations", "2.4 bits, whitening rotations trained (Cayley P1, P2)"),
    ):
        specs.append(
            Spec(f"liftq-2.4-{variant}", "liftq", setting, target_bits=2.4, variant=variant)
        )
    for bits, tuned in itertools.product((2.4, 3.0), (False, True)):  # `quantize --mixed`
        steps = FINETUNE_STEPS if tuned else 0
        setting = f"{bits:.1f} bits, mixed by sensitivity" + (
            f" + {steps}-step fine-tuning" * tuned
        )
        specs.append(
            Spec(
                f"liftq-{bits:.1f}-mixed" + "-ft" * tuned,
                "liftq",
                setting,
                target_bits=bits,
                finetune_steps=steps,
                mixed=True,
            )
        )
    specs.append(  # the two changes that each lowered WikiText-2 at 2.4 bits, together
        Spec("liftq-2.4-mixed-rotations", "liftq",
             "2.4 bits, mixed by sensitivity, whitening rotations trained (Cayley P1, P2)",
             target_bits=2.4, mixed=True, variant="rotations")
    )  # fmt: skip
    for bits in (2.4, 3.0):  # the longer schedule: twice the steps at twice the peak rate
        specs.append(
            Spec(
                f"liftq-{bits:.1f}-mixed-ft{LONG_FINETUNE_STEPS}",
                "liftq",
                f"{bits:.1f} bits, mixed by sensitivity + {LONG_FINETUNE_STEPS}-step fine-tuning "
                f"at lr {LONG_FINETUNE_LR}",
                target_bits=bits,
                finetune_steps=LONG_FINETUNE_STEPS,
                finetune_lr=LONG_FINETUNE_LR,
                mixed=True,
            )
        )
    return specs


def select(specs: list[Spec], patterns: str | None) -> list[Spec]:
    if not patterns:
        return specs
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatch(s.id, p) or s.method == p for p in wanted)]
    if not chosen:
        ids = ", ".join(s.id for s in specs)
        raise SystemExit(f"error: --rows '{patterns}' matches no row; rows are: {ids}")
    return chosen
