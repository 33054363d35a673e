"""`liftq quantize --dry-run`: the preflight from a preset's config alone (no weights), as a
table or JSON, the same figures as quant/preflight.plan, nothing written, and a job no
machine can hold refused in one line with exit 3."""

from __future__ import annotations

import json

import pytest

from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import resolve_architecture
from liftq_cli.quant.preflight import plan
from liftq_cli.quantize_job import CalibrationSettings, QuantizeJob, QuantizeSettings


def test_dry_run_of_llama_70b_needs_no_weights_and_matches_the_plan(cli, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "llama-70b", "--out", str(out), "--bits", "2.4", "--dry-run"]
    result = cli(*args, "--device", "cpu", "--nproc", "8", "--json")
    event = json.loads(result.stdout.strip().splitlines()[0])
    assert event["event"] == "preflight" and event["processes"] == 8
    job = QuantizeJob("llama-70b", out, LatticeConfig(24, 10), device="cpu")
    want = plan(job, resolve_architecture("llama-70b"), 8, devices=[])
    got = {r["name"]: r for r in event["resources"]}
    for resource in want.resources:
        assert got[resource.name]["need"] == resource.need, resource.name
        assert got[resource.name]["parts"] == resource.parts, resource.name
    assert event["estimate"]["blocks"] == 80 and event["estimate"]["is_estimate"]
    assert result.exit_code == (0 if all(r.fits for r in want.resources) else 3)
    table = cli(*args, "--device", "cpu")
    assert "preflight: llama-70b at LQ-24/10, 1 process" in table.stdout
    assert "time per block, cpu (estimate)" in table.stdout and "whiten" in table.stdout
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def test_a_job_no_machine_holds_is_refused_in_one_line_before_any_work(cli, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "llama-70b", "--out", str(out), "--bits", "2.4", "--device", "cpu"]
    args += ["--nsamples", "4096", "--seqlen", "4096"]  # 2.2 TB of activation streams
    settings = QuantizeSettings(calibration=CalibrationSettings(nsamples=4096, seqlen=4096))
    job = QuantizeJob("llama-70b", out, LatticeConfig(24, 10), settings=settings)
    need = next(r for r in plan(job, resolve_architecture("llama-70b"), devices=[]).resources
                if r.name == "host RAM").need  # fmt: skip
    assert need > 2 * 10**12
    result = cli(*args, "--dry-run")
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    # the first shortfall in the plan's order: the work dir's disk (2.2 TB of saved streams)
    # unless this machine has that much, then host RAM
    assert len(errors) == 1, errors
    assert errors[0].startswith(("error: --work-dir ", "error: host RAM: the job needs "))
    assert " TB " in errors[0] and ("free" in errors[0] or "available" in errors[0])
    assert not out.exists() and not (tmp_path / ".q.work").exists()


def test_a_real_run_is_refused_by_its_preflight_before_any_block(
    cli, tmp_path, tiny_llama, monkeypatch
):
    from tests.helpers import calibration_text

    from liftq_cli.quant import preflight

    monkeypatch.setattr(preflight, "host_memory", lambda: preflight.HostMemory(10**8, 10**9))
    out = tmp_path / "q"
    args = ["quantize", str(tiny_llama), "--out", str(out), "--config", "LQ-24/10"]
    args += ["--calib", str(calibration_text(tmp_path)), "--nsamples", "2", "--seqlen", "32"]
    result = cli(*args)
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "but 100.00 MB is available" in errors[0], errors
    assert not out.exists()
    assert (
        not list((tmp_path / ".q.work").glob("block_*"))
        if (tmp_path / ".q.work").exists()
        else True
    )


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-moe-30b-a3b"])
def test_dry_run_of_a_mixture_of_experts_preset_plans_it(cli, tmp_path, model):
    result = cli("quantize", model, "--bits", "2.4", "--out", str(tmp_path / "q"), "--dry-run")
    # planned, not refused: the block stage's memory and time (this 24 GB machine may be short)
    assert "mixture-of-experts" not in result.output and "time per block" in result.output
    assert result.exit_code in (0, 3), result.output
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing
