"""scripts/ci_batch.sh: the quantize -> eval -> pack -> push chain and its exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ci_batch.sh"
FAKE = """
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
codes = dict(i.split("=") for i in os.environ.get("FAKE_CODES", "").split(",") if i)
code = int(codes.get(sys.argv[1], 0))
print(json.dumps({"step": sys.argv[1], "exit_code": code}))
sys.exit(code)
"""


def run(tmp_path: Path, *args: str, liftq: str | None = None, **env: str):
    fake = tmp_path / "fake_liftq.py"
    fake.write_text(FAKE)
    environ = dict(os.environ, FAKE_LOG=str(tmp_path / "calls.log"), **env)
    environ["LIFTQ"] = liftq or f"{sys.executable} {fake}"
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=120
    )
    log = tmp_path / "calls.log"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_the_chain_runs_in_order_with_json(tmp_path):
    work = tmp_path / "work"
    result, calls = run(
        tmp_path, "smollm2-135m", "recipes/smollm2-135m-demo.yaml", "alice/demo", str(work),
        QUANTIZE_ARGS="--nsamples 8", PUSH_ARGS="--private",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [c[0] for c in calls] == ["quantize", "eval", "pack", "push"]
    assert all(c[-1] == "--json" for c in calls)
    quantize, evaluate, pack, push = calls
    recipe = "recipes/smollm2-135m-demo.yaml"
    assert quantize[:6] == [
        "quantize",
        "smollm2-135m",
        "--recipe",
        recipe,
        "--out",
        f"{work}/quantized",
    ]
    assert "--nsamples" in quantize
    assert evaluate[1] == f"{work}/quantized" and "--kld-ref" in evaluate
    assert evaluate[evaluate.index("--kld-ref") + 1] == "smollm2-135m"
    assert pack[1:4] == [f"{work}/quantized", "--out", f"{work}/packed"]
    assert push[1:6] == [f"{work}/packed", "--repo", "alice/demo", "--eval-json",
                         f"{work}/eval.json"]  # fmt: skip
    assert "--private" in push and "--dry-run" not in push
    for step in ("quantize", "eval", "pack", "push"):
        assert json.loads((work / f"{step}.json").read_text())["step"] == step
    summary = json.loads(result.stdout)
    assert summary == {
        "ok": True, "exit_code": 0, "repo": "alice/demo", "work_dir": str(work), "dry_run": False
    }  # fmt: skip


@pytest.mark.parametrize(("step", "code"), [("quantize", 2), ("pack", 3), ("push", 4)])
def test_the_first_failing_step_stops_the_chain_with_its_code(tmp_path, step, code):
    work = tmp_path / "work"
    result, calls = run(
        tmp_path, "m", "r.yaml", "alice/demo", str(work), FAKE_CODES=f"{step}={code}"
    )
    assert result.returncode == code
    order = ["quantize", "eval", "pack", "push"]
    assert [c[0] for c in calls] == order[: order.index(step) + 1]
    summary = json.loads(result.stdout)
    assert summary["ok"] is False and summary["failed_step"] == step
    assert summary["exit_code"] == code and summary["output"] == f"{work}/{step}.json"
    assert f"{step} failed with exit code {code}" in result.stderr


def test_dry_run_and_no_kld(tmp_path):
    result, calls = run(tmp_path, "m", "r.yaml", "alice/demo", str(tmp_path / "w"),
                        DRY_RUN="1", KLD_REF="")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in calls[3] and "--kld-ref" not in calls[1]
    assert json.loads(result.stdout)["dry_run"] is True


def test_wrong_invocation_is_exit_2(tmp_path):
    result, calls = run(tmp_path, "only-a-model")
    assert result.returncode == 2 and calls == []
    assert "usage:" in result.stderr


def test_real_liftq_bad_recipe_is_exit_2(tmp_path):
    liftq = Path(sys.executable).with_name("liftq")
    result, _ = run(
        tmp_path, "smollm2-135m", str(tmp_path / "missing.yaml"), "alice/demo",
        str(tmp_path / "w"), liftq=str(liftq),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    error = json.loads((tmp_path / "w" / "quantize.json").read_text())
    assert error["exit_code"] == 2 and "missing.yaml" in error["error"]
