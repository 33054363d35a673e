"""Static GPU checks of every LiftQuant kernel, without a GPU (issue 20).

Compiles every Triton kernel (the lift, the decode GEMV and its reduce, the prefill GEMM, the
int8/int4 lm_head GEMV) and every launch config for sm_80 (A100), sm_89 (RTX 4090 / L40) and
sm_90 (H100 / H200) with the Triton and ptxas bundled in our environment, reads the cubin
with the wheel's cuobjdump (registers, stack, shared memory) and nvdisasm (SASS), and prints
per kernel x config x arch: registers, spill bytes (stack frame and STL instructions), shared
memory against the arch's per-block limit, and for the decode GEMV the SASS instructions per
code bit of its inner loop (thread-level: the loop's warp instructions x 32 lanes x warps /
code bits per iteration).

It then predicts the decode (batch 1) GEMV time of every linear shape of the plan presets at
LQ-24/10 on H100, H200 and RTX 4090 as max(memory time, instruction time) over the codes the
kernel streams (the loop's instructions per bit times the bits, plus the straight-line code
per program), against the memory-bound time of the fp16 GEMV of the same shape. Peak figures
(datasheet values, not measurements) are in PEAKS. These are estimates until a GPU run of
bench/decode.py replaces them.

Exit status 1 on a compile error, shared memory over an arch's limit, a spill in a decode-path
kernel (GEMV, its reduce, the lift), or the issue's budget missed: the sm_90 GEMV at LQ-24/10
for the 8192 x 28672 layer above 2.8 instructions per code bit.

Usage: python bench/kernel_static.py [--arch 90 ...] [--quick] [--markdown PATH] [--json PATH]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import layer_linears, presets, resolve_architecture
from liftq_kernels import autotune
from liftq_kernels.bitgemm import _bitgemm_kernel
from liftq_kernels.bitgemv import REDUCE_BLOCK, _bitgemv_kernel, _reduce_kernel
from liftq_kernels.lift import _lattice_kernel, _pad, _rotate_kernel
from liftq_kernels.qlinear import BLOCK_N as LM_HEAD_BLOCK_N
from liftq_kernels.qlinear import (
    INT8_BLOCK_K,
    NUM_WARPS,
    _int4_gemv_kernel,
    _int8_gemv_kernel,
)
from liftq_kernels.qlinear_ref import DEFAULT_GROUP
from liftq_kernels.reference import padded_words

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ARCHS = {80: "A100", 89: "RTX 4090", 90: "H100/H200"}
SHARED_LIMIT = {80: 166912, 89: 101376, 90: 232448}  # max dynamic shared memory per block, B
# GPU: (arch, SMs, boost GHz, DRAM TB/s); 4 warp schedulers per SM issue one instruction each
# per clock (datasheets: H100 SXM5, H200 SXM, GeForce RTX 4090).
PEAKS = {
    "H100": (90, 132, 1.98, 3.35),
    "H200": (90, 132, 1.98, 4.8),
    "RTX 4090": (89, 128, 2.52, 1.008),
}
BUDGET_SHAPE = (8192, 28672)  # out x in: Llama-70B's down_proj
BUDGET = 2.8  # SASS instructions per code bit: 3x fp16 at 45% of H100 bandwidth (issue 20)
CONFIG = LatticeConfig(24, 10)
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?);")


@dataclass
class Compiled:
    kernel: str
    config: str
    arch: int
    registers: int
    stack: int
    spill_stores: int
    shared: int
    decode: bool
    loop_instructions: int = 0
    straight_instructions: int = 0
    bits_per_iteration: int = 0
    num_warps: int = 4

    @property
    def per_bit(self) -> float:
        if not self.bits_per_iteration:
            return 0.0
        return self.loop_instructions * 32 * self.num_warps / self.bits_per_iteration

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.spill_stores > 0

    @property
    def shared_ok(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch]


def _tool(name: str, *args: str) -> str:
    done = subprocess.run([str(BIN / name), *args], capture_output=True, text=True, check=True)
    return done.stdout


def _signature(fn: Any, pointers: dict[str, str], constexprs: dict[str, Any]) -> dict[str, str]:
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in fn.arg_names
    }


def _loop(sass: list[str]) -> tuple[int, int]:
    """(instructions of the largest backward-branch loop, all other instructions)."""
    labels = {
        m.group(1): i for i, line in enumerate(sass) if (m := re.match(r"^(\.L_x_\d+):", line))
    }
    count = [bool(INSTRUCTION.match(line)) for line in sass]
    best = 0
    for i, line in enumerate(sass):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and labels.get(m.group(1), i) < i:
            best = max(best, sum(count[labels[m.group(1)] : i + 1]))
    return best, sum(count) - best


def compile_kernel(
    kernel: Any,
    name: str,
    config: str,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    num_warps: int,
    arch: int,
    decode: bool,
    bits_per_iteration: int = 0,
    num_stages: int = 3,
) -> Compiled:
    """Compile one kernel variant for `arch` and read its resources and SASS."""
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # an autotuner wraps the JIT function
    divisible = {n: [["tt.divisibility", 16]] for n in pointers}
    source = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs, divisible)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(binary.asm["cubin"])
        usage = _tool("cuobjdump", "--dump-resource-usage", str(cubin))
        sass = _tool("nvdisasm", "-c", str(cubin)).splitlines()
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert found, usage
    registers, stack, static_shared, local = map(int, found.groups())
    shared = max(static_shared, int(binary.metadata.shared))
    loop, straight = _loop(sass) if bits_per_iteration else (0, 0)
    return Compiled(
        kernel=name,
        config=config,
        arch=arch,
        registers=registers,
        stack=stack + local,
        spill_stores=sum(" STL" in line for line in sass),
        shared=shared,
        decode=decode,
        loop_instructions=loop,
        straight_instructions=straight,
        bits_per_iteration=bits_per_iteration,
        num_warps=num_warps,
    )


def gemv_variants():
    """(name, config label, pointers, constexprs, warps, bits per loop iteration)."""
    pointers = {"z_ptr": "*fp16", "zs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16"}
    for rows, configs in autotune.GEMV_CONFIGS.items():
        for (block_n, warps, block_w), final, aligned in itertools.product(
            configs, (True, False), (True, False)
        ):
            out = "*fp16" if final else "*fp32"
            constexprs = {
                "WORDS_PER_SPLIT": 64,
                "ROWS": rows,
                "BLOCK_N": block_n,
                "BLOCK_W": block_w,
                "ALIGNED": aligned,
                "FINAL": final,
                "EMULATE": False,
            }
            label = gemv_label(rows, block_n, block_w, warps, final, aligned)
            bits = block_n * block_w * 32
            yield label, {**pointers, "y_ptr": out}, constexprs, warps, bits


def gemv_label(rows: int, block_n: int, block_w: int, warps: int, final: bool, aligned: bool):
    label = f"rows={rows} BLOCK_N={block_n} BLOCK_W={block_w} warps={warps}"
    return label + (" final" if final else " split-K") + ("" if aligned else " unaligned")


def lift_variants():
    rotate = {"a_ptr": "*fp16", "a_div_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}
    rotate |= {"c_div_ptr": "*fp16", "amax_ptr": "*fp32"}
    for div_a, div_c in ((True, False), (False, True)):
        constexprs = {"DIV_A": div_a, "DIV_C": div_c, "BLOCK": autotune.LIFT_BLOCK}
        stage = "Y = (X / s1) P2" if div_a else "U = P1^T Y / s2"
        yield "lift rotate", stage, rotate, constexprs, autotune.LIFT_WARPS
    lattice = {"u_ptr": "*fp32", "amax_ptr": "*fp32", "m_ptr": "*fp32", "z_ptr": "*fp16"}
    lattice["zs_ptr"] = "*fp32"
    for big_d, d in ((16, 8), (24, 10), (32, 20)):
        constexprs = {"D": big_d, "d": d, "BIG_D_P": _pad(big_d), "SMALL_D_P": _pad(d)}
        constexprs["S_BLOCK"] = autotune.LIFT_SLICES
        yield "lift lattice", f"LQ-{big_d}/{d}", lattice, constexprs, autotune.LIFT_WARPS


def gemm_variants():
    pointers = {"z_ptr": "*fp16", "zs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16"}
    pointers["y_ptr"] = "*fp16"
    for m, n, k, warps, stages in autotune.GEMM_SHAPES:
        constexprs = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
        yield f"({m}, {n}, {k}) warps={warps} stages={stages}", pointers, constexprs, warps, stages


def compile_all(archs: list[int], quick: bool) -> tuple[list[Compiled], list[str]]:
    results, errors = [], []

    def attempt(*args: Any, **kwargs: Any) -> None:
        try:
            results.append(compile_kernel(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001  (every compile failure is reported, then fails CI)
            errors.append(f"{args[1]} [{args[2]}] sm_{kwargs['arch']}: {str(exc).splitlines()[0]}")

    for arch in archs:
        for label, pointers, constexprs, warps, bits in gemv_variants():
            attempt(_bitgemv_kernel, "bitgemv", label, pointers, constexprs, warps, arch=arch,
                    decode=True, bits_per_iteration=bits)  # fmt: skip
        reduce_ptrs = {"part_ptr": "*fp32", "zs_ptr": "*fp32", "s_ptr": "*fp16", "y_ptr": "*fp16"}
        attempt(_reduce_kernel, "bitgemv reduce", f"BLOCK={REDUCE_BLOCK}", reduce_ptrs,
                {"BLOCK": REDUCE_BLOCK}, 4, arch=arch, decode=True)  # fmt: skip
        for name, label, pointers, constexprs, warps in lift_variants():
            attempt(_rotate_kernel if "rotate" in name else _lattice_kernel, name, label,
                    pointers, constexprs, warps, arch=arch, decode=True)  # fmt: skip
        lm_head = {"x_ptr": "*fp16", "s_ptr": "*fp16", "y_ptr": "*fp16"}
        attempt(_int8_gemv_kernel, "lm_head int8", f"BLOCK_N={LM_HEAD_BLOCK_N}",
                lm_head | {"w_ptr": "*i8"}, {"BLOCK_N": LM_HEAD_BLOCK_N, "BLOCK_K": INT8_BLOCK_K},
                NUM_WARPS, arch=arch, decode=True)  # fmt: skip
        attempt(_int4_gemv_kernel, "lm_head int4", f"GROUP={DEFAULT_GROUP}",
                lm_head | {"w_ptr": "*u8"}, {"BLOCK_N": LM_HEAD_BLOCK_N, "GROUP": DEFAULT_GROUP},
                NUM_WARPS, arch=arch, decode=True)  # fmt: skip
        for label, pointers, constexprs, warps, stages in gemm_variants():
            if quick and label != autotune_label(autotune.GEMM_SHAPES[0]):
                continue
            attempt(_bitgemm_kernel, "bitgemm", label, pointers, constexprs, warps, arch=arch,
                    decode=False, num_stages=stages)  # fmt: skip
    return results, errors


def autotune_label(shape: tuple[int, ...]) -> str:
    m, n, k, warps, stages = shape
    return f"({m}, {n}, {k}) warps={warps} stages={stages}"


def predict(results: list[Compiled]) -> list[dict[str, Any]]:
    """Decode-GEMV time per preset linear shape at LQ-24/10, batch 1, on every GPU of PEAKS."""
    by_key = {(r.arch, r.config): r for r in results if r.kernel == "bitgemv"}
    shapes = sorted(
        {
            (spec.out_features, spec.in_features)
            for name in presets()
            for spec in layer_linears(resolve_architecture(name), 0)
        }
        | {BUDGET_SHAPE}
    )
    rows = []
    for out_f, in_f in shapes:
        words = padded_words(-(-in_f // CONFIG.d) * CONFIG.D)
        plan = autotune.gemv_plan(1, out_f, words)
        label = gemv_label(
            1, plan.block_n, plan.block_w, plan.num_warps, plan.splits == 1, words % 4 == 0
        )
        if (plan.block_n, plan.num_warps, plan.block_w) not in autotune.GEMV_CONFIGS[1]:
            raise AssertionError(f"gemv_plan chose {label}, not a listed config")
        row: dict[str, Any] = {"out": out_f, "in": in_f, "config": label}
        row["splits"] = plan.splits
        code_bytes = out_f * words * 4
        fp16_bytes = out_f * in_f * 2
        programs = -(-out_f // plan.block_n) * plan.splits
        for gpu, (arch, sms, ghz, tbs) in PEAKS.items():
            compiled = by_key.get((arch, label))
            if compiled is None:
                continue
            bits = out_f * words * 32
            # straight-line code runs once per program (its warps, 32 lanes each)
            straight = compiled.straight_instructions * 32 * compiled.num_warps * programs
            instructions = bits * compiled.per_bit + straight
            # a grid smaller than the GPU leaves SMs idle: only min(programs, SMs) issue
            issue = min(sms, programs) * 4 * ghz * 1e9 * 32  # thread instructions per second
            compute_s = instructions / issue
            memory_s = code_bytes / (tbs * 1e12)
            fp16_s = fp16_bytes / (tbs * 1e12)
            row[gpu] = {
                "per_bit": round(instructions / bits, 3),
                "packed_us": round(max(compute_s, memory_s) * 1e6, 2),
                "memory_us": round(memory_s * 1e6, 2),
                "fp16_us": round(fp16_s * 1e6, 2),
                "speedup": round(fp16_s / max(compute_s, memory_s), 2),
                "programs": programs,
            }
        rows.append(row)
    return rows


def render(results: list[Compiled], errors: list[str], prediction: list[dict[str, Any]]) -> str:
    lines = [
        "# Static GPU figures of the LiftQuant kernels (compiled here, no GPU)",
        "",
        f"Triton {triton.__version__}, ptxas/cuobjdump/nvdisasm from the Triton wheel. "
        "Estimates until a GPU run of `bench/decode.py` measures them.",
        "",
        "| kernel | config | arch | registers | spills (stack B / STL) | shared B (limit) "
        "| loop SASS / iteration | instructions per code bit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per_bit = f"{r.per_bit:.2f}" if r.bits_per_iteration else "-"
        loop = str(r.loop_instructions) if r.bits_per_iteration else "-"
        lines.append(
            f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.registers} | {r.stack} / "
            f"{r.spill_stores} | {r.shared} ({SHARED_LIMIT[r.arch]}) | {loop} | {per_bit} |"
        )
    lines += ["", "Compile errors: " + ("; ".join(errors) if errors else "none"), ""]
    peaks = ", ".join(
        f"{gpu} {sms} SMs x 4 schedulers x {ghz} GHz, {tbs} TB/s"
        for gpu, (_, sms, ghz, tbs) in PEAKS.items()
    )
    lines += [
        f"## Predicted decode GEMV (batch 1, {CONFIG.name}) vs the fp16 GEMV's memory time",
        "",
        f"Peaks (datasheet): {peaks}. packed = max(codes / bandwidth, instructions / issue "
        "rate of min(programs, SMs) SMs); instructions = loop SASS per bit x code bits + "
        "straight-line code per program; fp16 = 2 bytes per weight / bandwidth. The lift "
        "(three small launches) and launch latency are not in it.",
        "",
        "| out x in | launch | splits | "
        + " | ".join(f"{g} per bit, packed us (fp16 us) x" for g in PEAKS)
        + " |",
        "|---|---|---|" + "---|" * len(PEAKS),
    ]
    for row in prediction:
        cells = []
        for gpu in PEAKS:
            p = row.get(gpu)
            cells.append(
                f"{p['per_bit']:.2f}, {p['packed_us']:.1f} ({p['fp16_us']:.1f}) {p['speedup']:.2f}x"
                if p
                else "-"
            )
        lines.append(
            f"| {row['out']} x {row['in']} | {row['config']} | {row['splits']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def verdicts(results: list[Compiled], errors: list[str], prediction: list[dict]) -> list[str]:
    """Every failed check, one line each (empty: all pass)."""
    failed = [f"compile error: {e}" for e in errors]
    for r in results:
        if not r.shared_ok:
            failed.append(f"{r.kernel} [{r.config}] sm_{r.arch}: shared {r.shared} B > limit")
        if r.decode and r.spills:
            failed.append(f"{r.kernel} [{r.config}] sm_{r.arch}: spills ({r.stack} B stack)")
    budget = next((p for p in prediction if (p["out"], p["in"]) == BUDGET_SHAPE), None)
    if budget is not None and "H100" in budget and budget["H100"]["per_bit"] > BUDGET:
        failed.append(
            f"GEMV {BUDGET_SHAPE} at {CONFIG.name}: {budget['H100']['per_bit']} instructions "
            f"per code bit on sm_90, budget {BUDGET}"
        )
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS))
    parser.add_argument("--quick", action="store_true", help="one GEMM config (tests)")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    archs = args.arch or sorted(ARCHS)
    start = time.perf_counter()
    results, errors = compile_all(archs, args.quick)
    prediction = predict(results)
    text = render(results, errors, prediction)
    print(text)
    failed = verdicts(results, errors, prediction)
    print(f"{len(results)} compiled in {time.perf_counter() - start:.0f} s; "
          + ("all checks pass" if not failed else f"{len(failed)} checks FAIL:"))  # fmt: skip
    for line in failed:
        print(f"  FAIL {line}")
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        payload = {
            "triton": triton.__version__,
            "kernels": [asdict(r) | {"per_bit": r.per_bit} for r in results],
            "errors": errors,
            "prediction": prediction,
            "failed": failed,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
