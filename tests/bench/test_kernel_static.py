"""bench/kernel_static.py: every kernel compiles for sm_80/89/90, within shared memory, with
no spills on the decode path, and the decode GEMV meets the issue's instruction budget.

The compile runs in a subprocess without TRITON_INTERPRET (under the interpreter `triton.jit`
gives no compilable function). The verdict and the SASS loop counter are also checked on
hand-made inputs, so the checks themselves can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench.kernel_static import BUDGET, BUDGET_SHAPE, Compiled, _loop, verdicts

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def test_the_loop_counter_finds_the_backward_branch():
    sass = [
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_1:",
        "        /*0010*/                   LOP3.LUT R2, R3, R4, R5, 0xa6, !PT ;",
        "        /*0020*/                   HADD2 R6, R6, R2 ;",
        "        /*0030*/               @P0 BRA `(.L_x_1) ;",
        "        /*0040*/                   EXIT ;",
    ]
    assert _loop(sass) == (3, 2)


def _compiled(**change) -> Compiled:
    base = dict(kernel="bitgemv", config="c", arch=89, registers=64, stack=0, spill_stores=0,
                shared=1024, decode=True)  # fmt: skip
    return Compiled(**{**base, **change})


def _budget_row(per_bit: float) -> dict:
    return {"out": BUDGET_SHAPE[0], "in": BUDGET_SHAPE[1], "H100": {"per_bit": per_bit}}


def test_each_check_fails_on_its_own_defect():
    assert verdicts([_compiled()], [], [_budget_row(BUDGET)]) == []
    assert "spills" in verdicts([_compiled(stack=16)], [], [])[0]
    assert "spills" in verdicts([_compiled(spill_stores=2)], [], [])[0]
    assert verdicts([_compiled(stack=16, decode=False)], [], []) == []  # prefill may spill
    assert "shared 101377 B > limit" in verdicts([_compiled(shared=101377)], [], [])[0]
    assert verdicts([_compiled(shared=101377, arch=90)], [], []) == []  # sm_90 holds 227 KB
    assert "compile error" in verdicts([], ["bitgemv sm_90: boom"], [])[0]
    assert "budget 2.8" in verdicts([], [], [_budget_row(BUDGET + 0.01)])[0]


def test_every_kernel_compiles_for_every_arch_and_meets_the_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static.json"
    command = [sys.executable, "bench/kernel_static.py", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["failed"] == []
    archs = {k["arch"] for k in report["kernels"]}
    assert archs == {80, 89, 90}
    kinds = {k["kernel"] for k in report["kernels"]}
    assert kinds == {
        "bitgemv", "bitgemv reduce", "lift rotate", "lift lattice", "bitgemm", "lm_head int8",
        "lm_head int4",
    }  # fmt: skip
    budget = next(p for p in report["prediction"] if (p["out"], p["in"]) == BUDGET_SHAPE)
    assert budget["H100"]["per_bit"] <= BUDGET
